"""Stage II aligns slides with RNA (then protein) on the known-answer cohort (2 Ray Train
workers, CPU, tiny CARE): held-out slide -> RNA retrieval far above chance, and region purity
w.r.t. the ground-truth tissue types does not drop."""

from __future__ import annotations

import json

import pytest
from factories import demo_in_new_process


@pytest.mark.slow
def test_stage2_retrieval_and_purity(tmp_path):
    from care_scale.training.loop import read_metrics

    report = demo_in_new_process("stage2", tmp_path)
    print(json.dumps(report))
    assert report["steps"] == report["steps_planned"]
    n_heldout = report["heldout_slides"]
    assert n_heldout == 51
    # Chance is 1/51 = 0.0196. Measured here (2 workers, 240 steps): top-1 0.235 for RNA and
    # 0.137 for protein (12x / 7x chance); the untrained encoder's pairs are at chance. We
    # require at least 0.1 (5x chance) on slides the run never saw.
    assert report["retrieval_chance"] == pytest.approx(1 / n_heldout, abs=1e-4)
    assert report["retrieval_top1"] >= 0.1, report
    assert report["protein_retrieval_top1"] >= 0.06, report  # 3x chance
    # The molecular signal also reaches the slide embedding: the dominant-type probe improves.
    assert report["probe_accuracy_after"] > report["probe_accuracy_before"], report
    # Region purity after stage II is at least as high as before it.
    assert report["region_purity_after"] >= report["region_purity_before"], report
    # Both phases ran: the metric log has RNA steps, then protein steps, and the contrastive
    # loss fell within the RNA phase.
    hist = read_metrics(report["checkpoint"].rsplit("/final", 1)[0])
    phases = [int(r["phase"]) for r in hist]
    assert phases == sorted(phases) and set(phases) == {0, 1}
    rna = [r["loss_clip"] for r in hist if int(r["phase"]) == 0]
    assert rna[-1] < rna[0] - 0.3, rna

