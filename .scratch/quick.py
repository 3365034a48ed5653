import sys, time
t = time.time()
from tests.test_train import quick
from tunefleet.distributed import sft
out = sys.argv[1]
r = quick(__import__("pathlib").Path(out), *sys.argv[2:])
print("import+load", time.time() - t)
t = time.time()
print("rc", sft.run(r, overwrite=True))
print("run s", time.time() - t)
