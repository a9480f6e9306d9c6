"""CT windowing presets and custom windows: hand-computed grey levels."""

import numpy as np
import pytest

from samliverseg.core.errors import InputError
from samliverseg.core.windowing import PRESETS, Window, apply_window, get_window

HU = np.array([-1000, -500, 0, 250, 1000, 2000], dtype=np.float32)


def test_wide_preset_values():
    # [-500, 1000] -> 0..255: g = floor((x + 500) * 255 / 1500); 0 HU is set back to 0.
    # 250 HU -> 750 * 255 / 1500 = 127.5 -> 127 (truncation, as np.uint8 in MedSAM's code).
    g = apply_window(HU, "wide")
    assert g.dtype == np.uint8
    assert g.tolist() == [0, 0, 0, 127, 255, 255]


def test_wide_keeps_zero_only_for_exact_zero():
    g = apply_window(np.array([0.0, 0.5, -0.5, 1.0, -1.0], dtype=np.float32), "wide")
    # without the rule 0 HU would be floor(500 * 255 / 1500) = 85
    assert g.tolist() == [0, 85, 84, 85, 84]
    w = get_window("wide")
    assert w.keep_zero and (w.low, w.high) == (-500.0, 1000.0)


def test_liver_preset_values():
    # [-300, 300]: g = floor((x + 300) * 255 / 600); 0 HU -> 127.5 -> 127 (no zero rule)
    g = apply_window(HU, "liver")
    assert g.tolist() == [0, 0, 127, int(550 * 255 / 600), 255, 255]
    assert g.tolist()[3] == 233


def test_abdomen_preset_is_w400_l40():
    w = get_window("abdomen")
    assert (w.low, w.high, w.width, w.level) == (-160.0, 240.0, 400.0, 40.0)
    g = apply_window(np.array([-160, 0, 40, 100, 240], dtype=np.float32), w)
    # floor((x + 160) * 255 / 400)
    assert g.tolist() == [0, 102, 127, 165, 255]


def test_custom_window_and_integer_input():
    g = apply_window(np.array([-200, -100, 50, 200, 300], dtype=np.int16), "-100,200")
    assert g.tolist() == [0, 0, 127, 255, 255]
    assert get_window(" -100 , 200 ") == Window(-100.0, 200.0, name="-100,200")
    assert get_window((-100, 200)).low == -100.0
    assert get_window("LIVER") is PRESETS["liver"]


def test_window_bounds_not_image_minmax():
    # A volume that does not span the window is not stretched: 0..100 HU in the liver window.
    g = apply_window(np.array([0, 100], dtype=np.float32), "liver")
    assert g.tolist() == [127, 170]


def test_shape_preserved_and_input_untouched():
    a = np.linspace(-1000, 1000, 2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    before = a.copy()
    g = apply_window(a, "wide")
    assert g.shape == a.shape
    np.testing.assert_array_equal(a, before)
    assert g.min() == 0 and g.max() == 255
    assert not (a == 0).any()
    assert np.all(np.diff(g.reshape(-1).astype(int)) >= 0)  # monotone (no exact 0 HU here)


@pytest.mark.parametrize("spec", ["lung", "", "100", "1,2,3", "a,b", "300,-300", "100,100", "nan,5", (1, 2, 3)])
def test_bad_specs(spec):
    with pytest.raises(InputError) as e:
        get_window(spec)
    assert "\n" not in str(e.value)


def test_spec_round_trip():
    for name in PRESETS:
        assert get_window(get_window(name).spec()) == PRESETS[name]
    assert get_window(get_window("-50,150").spec()) == get_window("-50,150")
