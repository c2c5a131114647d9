"""How good the embeddings are: probes on labels (the CARE paper's linear-probe and kNN
protocols) over the warehouse tables.

    embeddings.py   one vector per slide: slide, ROI or mean of regions
    labels.py       a labels CSV joined with those vectors (per slide or per case)
    splits.py       CARE/CLAM split files, or stratified (grouped) K-fold
    classifiers.py  logistic regression and kNN as the CARE code fits them
    metrics.py      balanced accuracy, macro AUROC, weighted F1; fold summary and bootstrap
    probe.py        run_probe(ProbeConfig): all of the above, plus the probes table
"""

from care_scale.evaluation.probe import ProbeConfig, ProbeResult, run_probe

__all__ = ["ProbeConfig", "ProbeResult", "run_probe"]
