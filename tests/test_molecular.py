"""Molecular inputs of stage II: formats, gene selection, and clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from care_scale.exceptions import TrainingDataError
from care_scale.synthetic.cohort import make_feature_cohort
from care_scale.training.molecular import (
    pair_slides,
    read_gene_list,
    read_mapping,
    read_molecular_table,
    read_protein_embeddings,
    select_genes,
    top_proteins,
)


@pytest.fixture(scope="module")
def cohort_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    cohort = make_feature_cohort(12, n_genes=30, n_proteins=15, seed=3)
    return cohort, cohort.write(out)


def test_cohort_files_round_trip(cohort_files):
    cohort, paths = cohort_files
    rna = read_molecular_table(paths["rna"])
    assert rna.samples == [s.sample_id for s in cohort.slides]
    assert rna.values.shape == (12, 30)
    np.testing.assert_allclose(rna.values, cohort.rna.to_numpy(), rtol=1e-5)
    mapping = read_mapping(paths["mapping"])
    kept, samples = pair_slides([s.slide_id for s in cohort.slides], rna, mapping=mapping)
    assert len(kept) == 12 and samples[0] == "sample-0000"
    # GMT: union of both sets; genes the table lacks are simply not selected.
    genes = read_gene_list(paths["gmt"])
    assert "NOT_MEASURED_1" in genes and len(genes) == 32
    sel = select_genes(rna, gene_list=genes, gene_list_uri=paths["gmt"])
    assert sel.features == rna.features
    top = select_genes(rna, n_genes=5)
    var = rna.values.var(0)
    assert sorted(top.features) == sorted(np.array(rna.features)[np.argsort(-var)[:5]])
    prot = read_molecular_table(paths["protein"])
    ids, vals = top_proteins(prot, 10)
    assert ids.shape == (12, 10) and np.all(np.diff(vals, axis=1) <= 0)
    emb = read_protein_embeddings(paths["protein_embeddings"], prot.features)
    assert emb.shape == (15, 16)


def test_mismatched_sample_ids_are_counted(cohort_files):
    cohort, paths = cohort_files
    rna = read_molecular_table(paths["rna"])
    mapping = read_mapping(paths["mapping"])
    slides = [s.slide_id for s in cohort.slides]
    # 3 slides not in the mapping, and 2 slides + 1 unknown id in the slide list
    partial = {k: v for k, v in mapping.items() if k not in slides[:3]}
    with pytest.raises(TrainingDataError) as err:
        pair_slides(slides + ["slide-9999"], rna, mapping=partial, mapping_uri=paths["mapping"])
    msg = str(err.value)
    assert "4 of 13 slides are not in the mapping" in msg
    assert "3 of 12 samples" in msg and "match no slide" in msg
    # Without a mapping the slide ids must equal the sample ids: nothing pairs.
    with pytest.raises(TrainingDataError, match="do not match at all: 12 of 12 slides"):
        pair_slides(slides, rna)
    # allow_unpaired drops (and logs) instead, keeping the 9 pairs
    kept, _ = pair_slides(slides, rna, mapping=partial, allow_unpaired=True)
    assert kept == slides[3:]


def test_nan_expression(tmp_path):
    frame = pd.DataFrame({"sample_id": ["a", "b", "c"], "G1": [1.0, np.nan, 2.0],
                          "G2": [0.5, 0.1, np.nan]})
    path = tmp_path / "rna.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(TrainingDataError) as err:
        read_molecular_table(str(path))
    assert "2 NaN/inf value(s) in 2 sample(s)" in str(err.value)
    assert str(path) in str(err.value)


def test_empty_tables(tmp_path):
    header_only = tmp_path / "rna.csv"
    header_only.write_text("sample_id,G1,G2\n")
    with pytest.raises(TrainingDataError, match="the table is empty"):
        read_molecular_table(str(header_only))
    blank = tmp_path / "blank.csv"
    blank.write_text("")
    with pytest.raises(TrainingDataError, match="blank.csv: the table is empty"):
        read_molecular_table(str(blank))
    pq = tmp_path / "prot.parquet"
    pd.DataFrame({"sample_id": pd.Series([], dtype=str),
                  "P1": pd.Series([], dtype=float)}).to_parquet(pq)
    with pytest.raises(TrainingDataError, match="prot.parquet: the table is empty"):
        read_molecular_table(str(pq))


def test_gene_list_matching_nothing(tmp_path, cohort_files):
    _, paths = cohort_files
    rna = read_molecular_table(paths["rna"])
    gl = tmp_path / "hallmark.txt"
    gl.write_text("TP53\nMYC\nEGFR\n")
    genes = read_gene_list(str(gl))
    with pytest.raises(TrainingDataError) as err:
        select_genes(rna, gene_list=genes, gene_list_uri=str(gl))
    assert "none of its 3 genes" in str(err.value) and "hallmark.txt" in str(err.value)


def test_other_bad_inputs(tmp_path):
    dup = tmp_path / "dup.csv"
    dup.write_text("sample_id,G1\na,1\na,2\n")
    with pytest.raises(TrainingDataError, match="1 duplicated sample id"):
        read_molecular_table(str(dup))
    with pytest.raises(TrainingDataError, match="no such file"):
        read_molecular_table(str(tmp_path / "missing.csv"))
    bad_map = tmp_path / "map.csv"
    bad_map.write_text("slide,sample\nx,y\n")
    with pytest.raises(TrainingDataError, match="mapping needs columns slide_id and sample_id"):
        read_mapping(str(bad_map))
    prot = tmp_path / "p.csv"
    prot.write_text("sample_id,P1,P2\na,1,2\n")
    with pytest.raises(TrainingDataError, match="fewer than the 10 most abundant"):
        top_proteins(read_molecular_table(str(prot)), 10)


def test_rna_encoder_init_from_checkpoint_with_key_map(tmp_path):
    import os
    import pickle

    import torch
    from safetensors.torch import save_file

    from care_scale.exceptions import CheckpointError, UnsafeCheckpointError
    from care_scale.training.encoders import ProteinEncoder, RNAEncoder, load_rna_checkpoint

    enc = RNAEncoder(n_genes=20, dim=16, layers=1, heads=2, out_dim=8)
    # A "foreign" checkpoint: scGPT-like names, one tensor of another shape, one unknown key.
    state = {"encoder.embedding.weight": torch.full((20, 16), 0.5),
             "value_encoder.net.0.weight": torch.full((16, 1), 0.25),
             "transformer_encoder.layers.0.linear1.weight": torch.zeros(99, 16),
             "decoder.fc.weight": torch.zeros(3, 3)}
    path = tmp_path / "scgpt.safetensors"
    save_file(state, str(path))
    loaded = load_rna_checkpoint(enc, str(path), {"encoder.embedding.": "gene_embedding.",
                                                  "transformer_encoder.": "transformer."})
    assert sorted(loaded) == ["gene_embedding.weight", "value_encoder.net.0.weight"]
    assert torch.all(enc.gene_embedding.weight == 0.5)
    save_file({"encoder.embedding.weight": torch.zeros(20, 16)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match="no key matches"):
        load_rna_checkpoint(enc, str(tmp_path / "b.safetensors"), {})  # mapping forgotten
    # weights-only torch files are fine; pickled objects are refused, never unpickled
    torch.save({"state_dict": {"gene_embedding.weight": torch.ones(20, 16)}},
               tmp_path / "ok.pt")
    assert load_rna_checkpoint(enc, str(tmp_path / "ok.pt")) == ["gene_embedding.weight"]
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"obj": os.getcwd}, fh)  # a global reference: needs arbitrary unpickling
    with pytest.raises(UnsafeCheckpointError, match="refused.*Unsupported") as err:
        load_rna_checkpoint(enc, str(tmp_path / "evil.pt"))
    assert "weights_only=False" not in str(err.value)  # never advise arbitrary unpickling
    # protein tokens from a user embedding table (frozen, projected) or learned
    table = np.random.default_rng(0).standard_normal((15, 16)).astype(np.float32)
    penc = ProteinEncoder(15, dim=16, layers=1, heads=2, out_dim=8, pretrained=table)
    out = penc(torch.tensor([[0, 3, 5]]), torch.tensor([[1.0, 0.5, 0.1]]))
    assert out.shape == (1, 8) and "protein_table" not in dict(penc.named_parameters())


def test_stage2_fit_reports_bad_molecular_input_before_training(tmp_path):
    """The driver checks the user's files before any Ray worker starts."""
    from care_scale.config import load_config
    from care_scale.training.config import Stage2Config
    from care_scale.training.loop import fit

    cohort = make_feature_cohort(10, embed_dim=192, n_genes=30, n_proteins=15, seed=4)
    paths = cohort.write(tmp_path / "c")
    rna = pd.read_csv(paths["rna"])
    rna.iloc[2:].to_csv(tmp_path / "rna_missing.csv", index=False)  # 2 samples lost

    def cfg(rna_path: str, **extra):
        return load_config(Stage2Config, None, {
            "data": {"feature_uris": [paths["features_dir"]]},
            "molecular": {"rna": rna_path, "protein": paths["protein"],
                          "mapping": paths["mapping"], **extra},
            "run": {"storage_path": str(tmp_path / "runs")}})

    with pytest.raises(TrainingDataError) as err:
        fit("stage2", cfg(str(tmp_path / "rna_missing.csv")))
    assert "2 of 10 slides have no row in" in str(err.value)
    assert "rna_missing.csv" in str(err.value)
    bad = tmp_path / "genes.txt"
    bad.write_text("TP53\n")
    with pytest.raises(TrainingDataError, match="none of its 1 genes"):
        fit("stage2", cfg(paths["rna"], gene_list=str(bad)))
    assert not (tmp_path / "runs").exists()  # nothing was started
