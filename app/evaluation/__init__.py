"""The evaluation suite of issue 13: APGD / Square on 2AFC, near-duplicate ROC and false matches, evasion
and impersonation, rank agreement and layer shares, for LPIPS-family models and the PDQ hash."""
