import warnings, torch; warnings.simplefilter("ignore")
from tunefleet.distributed import generate as gen
out = "/tmp/pytest-of-root/pytest-88/test_target_parameters_train_t0/run"
try:
    a, rows = gen.generate_for_run(out, ["Say hi.", "Name two colours of the sky at night please."], max_new_tokens=5)
    print(rows)
except Exception:
    import traceback; traceback.print_exc()
try:
    a, rows = gen.generate_for_run(out, ["Say hi."], max_new_tokens=5)
    print(rows)
except Exception:
    import traceback; traceback.print_exc()
