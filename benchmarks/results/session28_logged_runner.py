"""Run bench_simulated_user with session 28's rule logged: where a negative click's grown region, or
its HU band's continuation on a next slice, lies around the rest of that slice's mask
(``mask_edits._wraps``): then only the click's blob goes, on its slice, or the walk stops there;
and where a slice whose mask's HU says it holds no object still holds a faint dark object (its
end, by partial volume: ``mask_edits._holds_no_object`` differs from ``_no_object``)."""
import sys
import samliverseg.interactive.mask_edits as me
import bench_simulated_user as b
FIRES = {"wraps": 0, "calls": 0, "faint": 0, "no_object_calls": 0}
orig = me._wraps
def wraps(region, rest):
    r = orig(region, rest)
    FIRES["calls"] += 1
    if r:
        FIRES["wraps"] += 1
        print(f"    [FIRE wraps] region {int(region.sum())} rest {int(rest.sum())}", flush=True)
    return r
me._wraps = wraps
orig_h = me._holds_no_object
def holds(m, smooth, pixel_spacing, elsewhere, around):
    r = orig_h(m, smooth, pixel_spacing, elsewhere, around)
    FIRES["no_object_calls"] += 1
    if r != me._no_object(smooth[m], elsewhere):
        FIRES["faint"] += 1
        print(f"    [FIRE faint] mask {int(m.sum())} around {around:.0f}", flush=True)
    return r
me._holds_no_object = holds
rc = b.main(sys.argv[1:])
print("FIRES", FIRES)
sys.exit(rc)
