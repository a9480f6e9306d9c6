"""Run bench_simulated_user with the session-27 rules logged: where the enclosing-answer rule refuses
a click, and where the interior no-object verdict differs from the whole-mask verdict (the rule before)."""
import sys
import numpy as np
import samliverseg.interactive.session3d as s3
import samliverseg.interactive.mask_edits as me
import bench_simulated_user as b
FIRES = {"enclose": 0, "interior_differs": 0, "calls_enclose": 0, "calls_noobj": 0}
orig_enc = s3.CorrectionSession._encloses_with_other_tissue
def enc(self, part, sl, s):
    r = orig_enc(self, part, sl, s)
    FIRES["calls_enclose"] += 1
    if r:
        FIRES["enclose"] += 1
        print(f"    [FIRE enclose] slice {s} part {int(part.sum())} mask {int(sl.sum())}", flush=True)
    return r
s3.CorrectionSession._encloses_with_other_tissue = enc
if hasattr(me, "_holds_no_object"):
    orig_h = me._holds_no_object
    def h(mask2d, smooth_hu, pixel_spacing, elsewhere):
        r = orig_h(mask2d, smooth_hu, pixel_spacing, elsewhere)
        old = me._no_object(smooth_hu[mask2d > 0], elsewhere)
        FIRES["calls_noobj"] += 1
        if r != old:
            FIRES["interior_differs"] += 1
            print(f"    [FIRE interior] mask {int(mask2d.sum())} now {r} before {old}", flush=True)
        return r
    me._holds_no_object = h
rc = b.main(sys.argv[1:])
print("FIRES", FIRES)
sys.exit(rc)
