"""The evaluation suite: the split is disjoint from training, the cached-feature fast path equals the
metric pair by pair, the ROC helpers are exact, and the CLI writes a JSON the table renderer reads."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from app.cli.main import main
from app.evaluation import data
from app.evaluation.neardup import auc, negative_distances, positive_distances, threshold_at_fmr
from app.evaluation.scorers import LPIPSScorer, PDQScorer, encode, pairwise
from app.imaging import to_signed
from app.metric.store import ModelStore
from app.training.datasets import source_files, split_sources


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    """One intra-op thread: small tensors on a busy shared CPU run several times faster so."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_evaluation_images_were_never_used_in_training() -> None:
    evald = data.eval_files()
    trained = set(data.training_files())
    assert len(trained) == 900 and len(evald) == 124
    assert not trained & set(evald)
    files = source_files(data.IMAGENET)
    test = set(split_sources(len(files), 0, (0.8, 0.1, 0.1))["test"])
    assert {files.index(p) for p in evald if p.parent == data.IMAGENET} == test
    assert sum(p.parent == data.KODAK for p in evald) == 24
    trip = data.objective_triplets(200)
    assert set(trip.source.tolist()) <= test and len(trip) == 200
    assert bool((trip.kind == 0).all()) and set(trip.h.tolist()) <= {0.0, 1.0}


def test_objective_triplets_match_the_training_generator() -> None:
    """Slots that are objective in the training configuration are bit-identical here."""
    from app.training.datasets import SynthConfig, generate

    cfg = SynthConfig(images_dir=str(data.IMAGENET), sizes=(0, 0, 100))
    mixed = generate(cfg, "test", teacher=lambda a, b: (a - b).abs().flatten(1).mean(1))
    ours = data.objective_triplets(100)
    for k in range(len(mixed)):
        if int(mixed.kind[k]) == 0:
            j = [i for i in range(len(ours)) if int(ours.source[i]) == int(mixed.source[k])]
            assert any(torch.equal(ours.p0[i], mixed.p0[k]) for i in j)


@pytest.fixture(scope="module")
def small(store: ModelStore) -> tuple[LPIPSScorer, torch.Tensor, torch.Tensor]:
    x, groups = data.crop_views(data.eval_files()[:4], 64, 2)
    return LPIPSScorer("lpips-alex", store.load("lpips-alex"), 0.4578), x, groups


def test_pairwise_from_cached_features_equals_the_metric(small) -> None:  # type: ignore[no-untyped-def]
    scorer, x, groups = small
    fast = pairwise(scorer, encode(scorer, x))
    pairs = list(itertools.combinations(range(len(x)), 2))
    a = torch.tensor([i for i, _ in pairs])
    b = torch.tensor([j for _, j in pairs])
    with torch.no_grad():
        brute = scorer.metric(to_signed(x[a]), to_signed(x[b])).double()
    assert torch.allclose(fast[a, b], brute, rtol=1e-5, atol=1e-6)
    assert torch.allclose(fast, fast.T) and float(fast.diagonal().abs().max()) < 1e-5
    neg = negative_distances(scorer, x, groups)
    cross = groups[a] != groups[b]
    assert len(neg) == int(cross.sum()) == 24
    assert torch.allclose(neg, brute[cross], rtol=1e-5, atol=1e-6)


def test_mirror_invariant_distances_equal_the_metric_on_both_variants(small) -> None:  # type: ignore[no-untyped-def]
    scorer, x, groups = small
    pairs = [(i, j) for i, j in itertools.combinations(range(len(x)), 2) if groups[i] != groups[j]]
    a = torch.tensor([i for i, _ in pairs])
    b = torch.tensor([j for _, j in pairs])
    with torch.no_grad():
        plain = scorer.metric(to_signed(x[a]), to_signed(x[b])).double()
        flipped = scorer.metric(to_signed(x[a]), to_signed(x[b].flip(-1))).double()
    neg = negative_distances(scorer, x, groups, mirror=True)
    assert torch.allclose(neg, torch.minimum(plain, flipped), rtol=1e-5, atol=1e-6)
    assert bool((flipped < plain).any())  # the mirror does win some pairs
    orig = x[::2]
    copies = torch.stack([x[1::2], x[::2].flip(-1)], dim=1).flatten(0, 1)  # E = 2 per original
    pos = positive_distances(scorer, orig, copies, mirror=True)
    with torch.no_grad():
        want = scorer.metric(to_signed(orig.repeat_interleave(2, 0)), to_signed(copies)).double()
    assert bool((pos <= want + 1e-6).all())
    assert float(pos[1::2].max()) < 1e-5  # a mirrored copy is found at distance 0


def test_pdq_pairwise_is_the_hamming_distance(small) -> None:  # type: ignore[no-untyped-def]
    _, x, _ = small
    pdq = PDQScorer()
    f = encode(pdq, x)
    fast = pairwise(pdq, f)
    for i, j in itertools.combinations(range(len(x)), 2):
        assert float(fast[i, j]) == float((f[0][i] != f[0][j]).sum())


def test_fmr_threshold_and_auc_are_exact() -> None:
    neg = torch.arange(1, 200_001, dtype=torch.float64)  # 200k negatives: 2 allowed at FMR 1e-5
    t = threshold_at_fmr(neg, 1e-5)
    assert int((neg <= t).sum()) == 2 and t < 3.0 and t > 2.0
    assert auc(torch.tensor([0.5, 1.0]), torch.tensor([1.0, 2.0])) == pytest.approx(
        (1 + 0.5 + 1 + 1) / 4
    )


def test_card_cli_writes_json_and_markdown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "card.json"
    code = main(["evaluate", "card", "--models", "lpips-alex", "pdq", "--parts", "neardup", "agreement",
                 "--images", "3", "--resolution", "64", "--edits", "jpeg-q75", "hflip",
                 "--negative-views", "2", "--no-plots", "--out", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    nd = report["models"]["lpips-alex"]["neardup"]
    assert nd["n_negatives"] == 12 and nd["n_positives"] == 6
    assert set(nd["detection"]) == {"jpeg-q75", "hflip"}
    assert report["models"]["pdq"]["threshold"] == 31.0
    shares = report["models"]["lpips-alex"]["agreement"]["layer_shares"]
    assert len(shares) == 5 and sum(shares) == pytest.approx(1.0, abs=1e-5)
    assert out.with_suffix(".md").is_file()
    capsys.readouterr()
    assert main(["evaluate", "card-table", str(out)]) == 0
    assert "False matches" in capsys.readouterr().out


def test_attack_parts_of_the_card_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The 2AFC and evasion parts end to end at toy sizes: every attack reported, PDQ only black-box."""
    out = tmp_path / "attacks.json"
    code = main(["evaluate", "card", "--models", "lpips-alex", "pdq", "--parts", "2afc", "attacks",
                 "--triplets", "4", "--steps", "3", "--restarts", "2", "--other-steps", "2",
                 "--queries", "4", "--images", "2", "--resolution", "64", "--edits", "jpeg-q75",
                 "--attack-pairs", "2", "--attack-steps", "2", "--attack-queries", "3",
                 "--no-plots", "--out", str(out)])  # fmt: skip
    assert code == 0
    capsys.readouterr()
    models = json.loads(out.read_text())["models"]
    lp, pdq = models["lpips-alex"], models["pdq"]
    assert len(lp["2afc"]["attacks"]) == 6 and lp["2afc"]["n"] == 4
    assert [a["method"] for a in pdq["2afc"]["attacks"]] == ["square"]
    for a in lp["2afc"]["attacks"]:
        assert a["accuracy"] <= lp["2afc"]["clean"]
        limit = a["epsilon"] if a["norm"] == "linf" else 1e9
        assert a["max_linf"] <= limit + 1e-6
    assert lp["evasion"]["method"] == "apgd" and pdq["evasion"]["method"] == "square"
    assert lp["impersonation"]["pairs"] == 2


def test_attack_option_and_merge() -> None:
    import argparse

    from app.cli.evaluation import attack_arg
    from app.evaluation.report import merge

    spec = attack_arg("apgd,linf,8/255,right,100,3")
    assert (spec.method, spec.target, spec.steps, spec.restarts) == ("apgd", "right", 100, 3)
    assert spec.epsilon == pytest.approx(8 / 255)
    assert attack_arg("square,l2,3,ref").queries == 1000
    from app.cli.main import build_parser

    args = build_parser().parse_args(["evaluate", "apgd", "--attack", "apgd,linf,8/255,right"])
    assert [a.target for a in args.attack] == ["right"] and args.parts == ["2afc"]
    for bad in ("apgd,linf", "pgd,linf,4/255,ref", "apgd,linf,4/255,p0"):
        with pytest.raises(argparse.ArgumentTypeError):
            attack_arg(bad)
    a = {"label": "A", "accuracy": 0.5}
    b = {"label": "B", "accuracy": 0.7}
    r1 = {"meta": {}, "models": {"m": {"2afc": {"clean": 1.0, "attacks": [a]}, "x": 1}}}
    r2 = {"meta": {}, "models": {"m": {"2afc": {"clean": 1.0, "attacks": [b]}}}}
    m = merge([r1, r2])["models"]["m"]
    assert [x["label"] for x in m["2afc"]["attacks"]] == ["A", "B"] and m["x"] == 1
