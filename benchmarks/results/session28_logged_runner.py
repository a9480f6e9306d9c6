"""Run bench_simulated_user with session 28's rule logged: where a negative click's grown region, or
its HU band's continuation on a next slice, lies around the rest of that slice's mask
(``mask_edits._wraps``): then only the click's blob goes, on its slice, or the walk stops there;
and where a slice whose mask's HU says it holds no object still holds a faint dark object (its
end, by partial volume: ``mask_edits._holds_no_object`` differs from ``_no_object``)."""
import sys
import samliverseg.interactive.mask_edits as me
import bench_simulated_user as b

FIRES = {}


def log_when(name, fired, describe):
    """Replace ``mask_edits.<name>`` by a wrapper that counts its calls and prints where
    ``fired(args, result)`` holds."""
    orig = getattr(me, name)

    def wrapper(*args):
        result = orig(*args)
        FIRES[name + " calls"] = FIRES.get(name + " calls", 0) + 1
        if fired(args, result):
            FIRES[name] = FIRES.get(name, 0) + 1
            print(f"    [FIRE {name}] {describe(args)}", flush=True)
        return result
    setattr(me, name, wrapper)


log_when("_wraps", lambda a, r: r, lambda a: f"region {int(a[0].sum())} rest {int(a[1].sum())}")
# the faint-end rule: where the verdict differs from the HU-only one (the rule before)
log_when("_holds_no_object", lambda a, r: r != me._no_object(a[1][a[0]], a[3]),
         lambda a: f"mask {int(a[0].sum())}")
rc = b.main(sys.argv[1:])
print("FIRES", FIRES)
sys.exit(rc)
