"""Loaders for every weights layout, the manifest, and the store's verification and errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from app.cli.main import main
from app.metric import LPIPS, Heads, Trunk
from app.metric.loaders import LayoutError, head_weights, read_state, save_bundle, trunk_state
from app.metric.store import ModelStore, WeightsError, file_hashes

OFFICIAL = ["linf-x0", "linf-x1", "linf-ref", "linf-x0-x1", "linf-x0-tune", "ssa-x0"]


def images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    return x0, (x0 + 0.2 * torch.randn(2, 3, 64, 64, generator=g)).clamp(-1, 1)


def custom_store(
    tmp_path: Path, files: dict[str, Path], trunk_file: str, heads_file: str
) -> ModelStore:
    """A one-model store whose manifest lists ``files`` by their real sha256."""
    entries = {
        fid: {
            "filename": p.name,
            "digests": [{"kind": "sha256", "value": file_hashes(p)[0]}],
            "license": "test",
        }
        for fid, p in files.items()
    }
    manifest = {
        "format": 1,
        "default": "m",
        "files": entries,
        "models": {
            "m": {
                "trunk": {"arch": "alex", "file": trunk_file},
                "heads": heads_file,
                "variant": "test",
                "source": "test",
                "threshold": 0.1,
                "card": "none",
            }
        },
    }
    root = tmp_path / "store"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps(manifest))
    return ModelStore(root, weights_dir=tmp_path, cache_dir=tmp_path / "cache")


def test_manifest_lists_every_model(store: ModelStore) -> None:
    names = set(store.names)
    assert {"lpips-alex", "lpips-squeeze", "lpips-vgg"} <= names
    assert {f"r-lpips-alex-{v}" for v in OFFICIAL} <= names
    assert store.manifest.default in names
    for name in names:
        m = store.model(name)
        for fid in store.files_of(name):
            f = store.manifest.files[fid]
            assert f.license and f.digests
        assert (store.root / m.card).is_file(), f"{name}: model card {m.card} missing"
    # heads-only R-LPIPS variants share the ImageNet AlexNet trunk with LPIPS; tune has its own
    assert store.model("r-lpips-alex-linf-x0").trunk.file == store.model("lpips-alex").trunk.file
    assert (
        store.model("r-lpips-alex-linf-x0-tune").trunk.file != store.model("lpips-alex").trunk.file
    )


def test_verify_passes_on_offline_weights(
    weights_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLPIPS_WEIGHTS_DIR", str(weights_dir))
    assert main(["store", "verify", "lpips-alex", "lpips-squeeze"]) == 0
    out = capsys.readouterr().out
    assert "ok       alexnet-imagenet" in out and "CORRUPT" not in out
    assert main(["store", "verify", "lpips-vgg"]) == 1  # the VGG trunk is not available offline


def test_vgg_without_weights_fails_clearly(store: ModelStore) -> None:
    with pytest.raises(
        WeightsError, match=r"vgg16-397923af\.pth.*397923af.*download\.pytorch\.org"
    ):
        store.load("lpips-vgg")


def test_truncated_and_wrong_files_are_refused(weights_dir: Path, tmp_path: Path) -> None:
    wdir = tmp_path / "w"
    wdir.mkdir()
    data = (weights_dir / "lpips-v0.1-alex-lin.pth").read_bytes()
    (wdir / "lpips-v0.1-alex-lin.pth").write_bytes(data[:-100])
    shutil.copy(weights_dir / "alexnet-features.pth", wdir)
    st = ModelStore(weights_dir=wdir, cache_dir=tmp_path / "cache")
    with pytest.raises(WeightsError) as info:
        st.load("lpips-alex")
    msg = str(info.value)
    assert "lpips-v0.1-alex-lin.pth" in msg and "df73285e" in msg and "RLPIPS_WEIGHTS_DIR" in msg


def test_pull_verifies_downloads_without_network(weights_dir: Path, tmp_path: Path) -> None:
    st = ModelStore(weights_dir=None, cache_dir=tmp_path / "cache")
    urls: list[str] = []

    def fake_fetch(url: str, dest: Path) -> None:
        urls.append(url)
        name = "alexnet-features.pth" if "alexnet" in url else "lpips-v0.1-alex-lin.pth"
        shutil.copy(weights_dir / name, dest)

    paths = st.pull("lpips-alex", fetch=fake_fetch)
    assert set(paths) == {"alexnet-imagenet", "lpips-v0.1-alex"}
    assert all(p.parent == tmp_path / "cache" for p in paths.values())
    assert any("download.pytorch.org" in u for u in urls)
    st.load("lpips-alex")  # loads from the cache now

    def bad_fetch(url: str, dest: Path) -> None:
        dest.write_bytes(b"<html>not found</html>")

    with pytest.raises(WeightsError, match="expected"):
        ModelStore(weights_dir=None, cache_dir=tmp_path / "c2").pull(
            "lpips-squeeze", fetch=bad_fetch
        )
    assert not (tmp_path / "c2" / "squeezenet1_1-b8a52dc0.pth").exists()


def test_import_copies_verified_files(weights_dir: Path, tmp_path: Path) -> None:
    st = ModelStore(weights_dir=None, cache_dir=tmp_path / "cache")
    found = st.import_dir(weights_dir)
    assert {"alexnet-imagenet", "squeezenet1_1-imagenet", "lpips-v0.1-alex"} <= set(found)
    assert st.resolve("alexnet-imagenet").parent == tmp_path / "cache"


def test_torchvision_state_with_classifier_round_trip(store: ModelStore, tmp_path: Path) -> None:
    """A full torchvision AlexNet state dict (features + classifier) loads as the trunk."""
    from torchvision.models import alexnet

    net = alexnet(weights=None)
    net.features.load_state_dict(
        {
            k.removeprefix("features."): v
            for k, v in store.load_trunk("lpips-alex").state_dict().items()
        }
    )
    full = tmp_path / "alexnet-full.pth"
    torch.save(net.state_dict(), full)
    heads = tmp_path / "heads.pth"
    shutil.copy(store.resolve("lpips-v0.1-alex"), heads)
    st = custom_store(tmp_path, {"t": full, "h": heads}, "t", "h")
    x0, x1 = images()
    with torch.inference_mode():
        torch.testing.assert_close(
            st.load("m")(x0, x1), store.load("lpips-alex")(x0, x1), atol=0, rtol=0
        )


def test_official_rlpips_layout_round_trip(store: ModelStore, tmp_path: Path) -> None:
    """A checkpoint in the official R-LPIPS key layout (net.sliceK.N.*, lin*, lins*) survives import."""
    ref = store.load("lpips-alex")
    slices = {0: 1, 1: 1, 3: 2, 4: 2, 6: 3, 7: 3, 8: 4, 9: 4, 10: 5, 11: 5}
    g = torch.Generator().manual_seed(0)
    heads = [torch.rand(w.shape, generator=g) for w in ref.heads.weights]
    ckpt: dict[str, torch.Tensor] = {}
    for key, v in ref.trunk.state_dict().items():
        _, idx, param = key.split(".")
        ckpt[f"net.slice{slices[int(idx)]}.{idx}.{param}"] = v
    for k, w in enumerate(heads):
        ckpt[f"lin{k}.model.1.weight"] = w
        ckpt[f"lins.{k}.model.1.weight"] = w.clone()
    path = tmp_path / "latest_net_linf_x0.pth"
    torch.save(ckpt, path)
    st = custom_store(tmp_path, {"ck": path}, "ck", "ck")
    metric = st.load("m")
    assert all(torch.equal(a, b) for a, b in zip(metric.heads.weights, heads, strict=True))
    x0, x1 = images(1)
    with torch.inference_mode():
        expected = LPIPS(ref.trunk, Heads(heads))(x0, x1)
        torch.testing.assert_close(metric(x0, x1), expected, atol=0, rtol=0)


def test_official_checkpoints_are_identified_by_git_blob(store: ModelStore, tmp_path: Path) -> None:
    """The manifest's git blob id check accepts the exact bytes and nothing else."""
    data = b"pretend checkpoint bytes"
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert file_hashes(path)[1] == blob
    entry = store.manifest.files["r-lpips-linf_x0"]
    assert entry.digests[0].kind == "git_blob"
    assert entry.digests[0].value == "f1435696083bf5b16385efd794af44fcbe49f175"
    with pytest.raises(WeightsError, match=r"latest_net_linf_x0\.pth.*f1435696.*SaraGhazanfari"):
        store.load("r-lpips-alex-linf-x0")


def test_bundle_round_trip(store: ModelStore, tmp_path: Path) -> None:
    ref = store.load("lpips-alex")
    path = tmp_path / "b.safetensors"
    save_bundle(path, list(ref.heads.weights), ref.trunk.state_dict(), {"arch": "alex"})
    state = read_state(path)
    st = custom_store(tmp_path, {"b": path}, "b", "b")
    x0, x1 = images(2)
    with torch.inference_mode():
        torch.testing.assert_close(st.load("m")(x0, x1), ref(x0, x1), atol=0, rtol=0)
    assert len(head_weights(state)) == 5 and "features.0.weight" in trunk_state(state)


def test_wrong_layouts_are_named(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="no head weights"):
        head_weights({"foo.weight": torch.zeros(1)}, "x.pth")
    with pytest.raises(LayoutError, match="no trunk weights"):
        trunk_state({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, "x.pth")
    with pytest.raises(LayoutError, match="differs"):
        head_weights(
            {
                "lin0.model.1.weight": torch.ones(1, 3, 1, 1),
                "lins.0.model.1.weight": torch.zeros(1, 3, 1, 1),
            }
        )
    bad = tmp_path / "heads.pth"
    torch.save({"lin0.model.1.weight": torch.ones(1, 7, 1, 1)}, bad)
    trunk = tmp_path / "trunk.pth"
    torch.save({"features.0.weight": torch.ones(2, 2)}, trunk)
    st = custom_store(tmp_path, {"t": trunk, "h": bad}, "t", "h")
    with pytest.raises(WeightsError, match=r"trunk\.pth.*missing"):
        st.load_trunk("m")
    with pytest.raises(ValueError, match="do not fit"):
        LPIPS(Trunk("alex"), st.load_heads("m"))
    with pytest.raises(ValueError, match="negative"):
        Heads([-torch.ones(1, 64, 1, 1)])
