import math

import numpy as np
import pytest

from dinokit import cosine_scheduler


def independent_cosine(base, final, epochs, niter, warmup_epochs=0, start=0.0):
    out = []
    tw = warmup_epochs * niter
    for i in range(tw):
        out.append(start + (base - start) * i / (tw - 1) if tw > 1 else base)
    T = epochs * niter - tw
    for i in range(T):
        out.append(final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / T)))
    return np.array(out)


@pytest.mark.parametrize("warm", [0, 1, 3])
def test_equals_independent_formula(warm):
    got = cosine_scheduler(2e-3, 1e-6, 10, 7, warmup_epochs=warm)
    np.testing.assert_allclose(got, independent_cosine(2e-3, 1e-6, 10, 7, warm), rtol=1e-12, atol=0)


def test_reference_endpoints_16x64_100_epochs():
    lr = cosine_scheduler(0.002, 1e-6, 100, 1251, warmup_epochs=10)
    assert len(lr) == 125100
    assert lr[0] == 0
    assert lr[12509] == pytest.approx(0.002) and lr[12510] == pytest.approx(0.002)
    assert lr[-1] == pytest.approx(1.0000004e-6, rel=1e-5)
    wd = cosine_scheduler(0.04, 0.4, 100, 1251)
    assert wd[0] == pytest.approx(0.04) and wd[len(wd) // 2] == pytest.approx(0.22, rel=1e-4)
    m = cosine_scheduler(0.996, 1, 100, 1251)
    assert m[0] == 0.996 and m[-1] < 1 and m[-1] == pytest.approx(0.99999999999937, abs=1e-13)


def test_warmup_longer_than_training_is_an_error():
    with pytest.raises(ValueError):
        cosine_scheduler(1, 0, 2, 3, warmup_epochs=5)


def test_negative_lengths_are_named():
    with pytest.raises(ValueError, match="must be >= 0, got 1, -2 and 0"):
        cosine_scheduler(1.0, 0.0, 1, -2)
