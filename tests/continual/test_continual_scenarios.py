"""Pure tests of continual.scenarios (no training)."""

import pytest
import torch

from fedadapt.continual.scenarios import ContinualScenario, phase_domain, phase_site_data
from fedadapt.imaging.synthetic import default_sites


def test_site_incremental_blocks_join_over_phases():
    s = ContinualScenario("site-incremental", num_sites=6, num_phases=3, rounds_per_phase=2)
    assert [s.active_sites(p) for p in range(3)] == [(0, 1), (2, 3), (4, 5)]
    assert s.total_rounds == 6
    assert [s.phase_of_round(r) for r in range(1, 7)] == [0, 0, 1, 1, 2, 2]
    # a site keeps the domain of the phase it joined in
    assert s.site_domain(4, 0) == phase_domain(2)
    assert phase_domain(2).invert


def test_domain_incremental_all_sites_shift():
    s = ContinualScenario("domain-incremental", num_sites=2, num_phases=4)
    assert s.active_sites(3) == (0, 1)
    assert s.site_domain(0, 0) == phase_domain(0)
    assert s.site_domain(0, 3) == phase_domain(1)  # later phases cycle 1, 2


def test_validation_names_field():
    with pytest.raises(ValueError, match="scenario='x'"):
        ContinualScenario("x", num_sites=3)
    with pytest.raises(ValueError, match="num_sites=2 too small"):
        ContinualScenario("site-incremental", num_sites=2, num_phases=3)
    with pytest.raises(ValueError, match="outside"):
        ContinualScenario("domain-incremental", num_sites=2).phase_of_round(4)


def test_inverted_phase_negates_images_with_same_labels():
    spec = default_sites(1, 8, 4, seed=0)[0]
    kw = dict(image_size=16, num_classes=2, seed=0, site_index=0, phase=2)
    plain = phase_site_data(spec, phase_domain(0), **kw)
    inv = phase_site_data(spec, phase_domain(2), **kw)
    torch.testing.assert_close(inv[0].tensors[0], -plain[0].tensors[0])
    assert torch.equal(inv[1].tensors[1], plain[1].tensors[1])
