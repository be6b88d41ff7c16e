#!/bin/bash
# On the GPU machine, from the repository root with the bundle of `make gpu-bundle` (and py-spy's binary
# copied to .gpu/py-spy): the GPU service under load from 4 load generators, sampled with py-spy.
# Writes into $OUT; the breakdown is docs/benchmarks/gpu-profile-h200.json.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target .gpu/site .gpu/wheels/*.whl
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.gpu/site:$PWD RLPIPS_SHARED_DIR=$PWD/.gpu/shared RLPIPS_WEIGHTS_DIR=$PWD/.gpu/shared/weights
export RLPIPS_DEVICE=cuda RLPIPS_RESOLUTION=256 RLPIPS_MAX_BATCH_PAIRS=256 RLPIPS_MAX_WAIT_MS=2 RLPIPS_CACHE_ENTRIES=0 RLPIPS_QUEUE_SIZE=4096
python3 -m app.cli serve --port 8111 --log-level warning > $OUT/prof-server.log 2>&1 &
SRV=$!
for i in $(seq 1 120); do curl -s localhost:8111/readyz | grep -q ready && break; sleep 0.5; done
for i in 1 2 3 4; do python3 -m benchmarks.loadgen --url http://127.0.0.1:8111 --concurrency 16 --duration 12 --warmup 3 > $OUT/prof-load-$i.json & done
sleep 6
.gpu/py-spy record --pid $SRV --nonblocking --threads -r 50 -f raw -d 8 -o $OUT/prof-raw.txt > $OUT/prof-spy.log 2>&1
.gpu/py-spy dump --pid $SRV > $OUT/prof-dump.txt 2>&1
top -b -n 1 -H -p $SRV | head -40 > $OUT/prof-top.txt
wait %2 %3 %4 %5 2>/dev/null
kill $SRV; wait $SRV
cat $OUT/prof-load-*.json
python3 -c "
import sys; sys.path.insert(0,'.')
from benchmarks.profile import breakdown
print(breakdown(open('$OUT/prof-raw.txt').read()))"
head -25 $OUT/prof-top.txt
