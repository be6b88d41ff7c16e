"""The known-items bank: "is this upload a near copy of anything we know?" with exact distances.

No HTTP here. :mod:`app.bank.embedding` (a lower-bounding embedding of the LPIPS distance),
:mod:`app.bank.storage` (SQLite rows + an in-memory FAISS index per bank) and :mod:`app.bank.service`
(the pipeline on the runtime: decode pool, device thread, exact stage through the engine).
"""
