import numpy as np
import pytest

from fedray.aggregation import staleness as st
from fedray.errors import ConfigError


def test_values_by_hand():
    assert st.constant(7) == 1.0
    assert st.polynomial(0) == 1.0
    assert st.polynomial(3) == pytest.approx(0.5)  # 4^-0.5
    assert st.polynomial(8, a=1.0) == pytest.approx(1 / 9)
    assert st.hinge(0) == 1.0
    assert st.hinge(4) == 1.0  # s <= b
    assert st.hinge(5) == pytest.approx(1 / 11)  # 1/(10*1 + 1)
    assert st.hinge(6, a=2, b=4) == pytest.approx(1 / 5)  # 1/(2*2 + 1)
    assert st.inv_sqrt(0) == 1.0
    assert st.inv_sqrt(3) == pytest.approx(0.5)
    assert st.prfl(7, 6, a=1.0) == pytest.approx(0.5)  # (7-6+1)^-1
    assert st.prfl(5, 3) == pytest.approx(3 ** -0.6)
    assert st.prfl(4, 4) == 1.0


def test_vectorised_and_scalar_types():
    s = np.array([0, 3, 8])
    np.testing.assert_allclose(st.polynomial(s), [1.0, 0.5, 1 / 3])
    np.testing.assert_allclose(st.inv_sqrt(s), [1.0, 0.5, 1 / 3])
    np.testing.assert_allclose(st.hinge(np.array([3, 4, 5, 14])), [1, 1, 1 / 11, 1 / 101])
    np.testing.assert_array_equal(st.constant(s), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(st.prfl(10, np.array([10, 9, 7]), a=1.0), [1.0, 0.5, 0.25])
    assert isinstance(st.polynomial(2), float)
    assert isinstance(st.hinge(np.int64(2)), float)


def test_negative_staleness_rejected():
    with pytest.raises(ValueError, match="staleness"):
        st.polynomial(-1)
    with pytest.raises(ValueError, match="staleness"):
        st.prfl(3, 5)


def test_registry_and_get():
    assert set(st.STALENESS) == {"constant", "polynomial", "hinge", "inv_sqrt", "prfl"}
    assert st.get("polynomial", a=1.0)(1) == pytest.approx(0.5)
    assert st.get("hinge", a=10, b=2)(3) == pytest.approx(1 / 11)
    assert st.get("inv_sqrt")(8) == pytest.approx(1 / 3)
    assert st.get("prfl")(2) == pytest.approx(st.prfl(2, 0))  # (2+1)^-0.6
    assert st.get("constant")(100) == 1.0


def test_get_errors_name_the_field():
    with pytest.raises(ConfigError) as e:
        st.get("exponential")
    assert e.value.field == "aggregation.staleness" and "exponential" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="'q'"):
        st.get("hinge", q=1)
    with pytest.raises(ConfigError, match="'a'"):
        st.get("polynomial", a=-0.5)
    with pytest.raises(ConfigError, match="'a'"):
        st.get("constant", a=1)
