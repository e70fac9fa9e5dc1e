"""Model loading under misuse (issue 27, low): malformed checkpoints and configs are refused with a message that says
what to do (never a traceback, never the generic message, never a server path); a folder that asks to run its own
code is refused before transformers can ask; an allow-list entry written ``timm:X`` loads."""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import pytest
import torch

import vizapp
from tests.conftest import write_card_model
from vizapp import budget as B
from vizapp.errors import ModelLoadError, ModelTooLargeError


def test_an_allow_list_entry_with_the_timm_prefix_loads(monkeypatch):
    """``VIZAPP_MODELS=timm:X`` passed load_model's check but the timm adapter checked the bare ``X`` and refused it:
    such an entry never loaded, with either spelling of the id."""
    monkeypatch.setattr(B, "BUDGET", B.Budget(allowed=frozenset({"timm:vit_tiny_patch16_224"})))
    kw = dict(pretrained=False, device="cpu", img_size=32, depth=1)
    assert vizapp.load_model("timm:vit_tiny_patch16_224", **kw).source == "random"
    assert vizapp.load_model("vit_tiny_patch16_224", **kw).source == "random"
    with pytest.raises(ModelTooLargeError, match="not one of the models this server offers"):
        vizapp.load_model("timm:vit_small_patch16_224", **kw)
    monkeypatch.setattr(B, "BUDGET", B.Budget(allowed=frozenset({"vit_tiny_patch16_224"})))
    assert vizapp.load_model("timm:vit_tiny_patch16_224", **kw).source == "random"


def _card(tmp_path: Path, case: str) -> str:
    """A card model (tiny.safetensors + tiny.json) in its own folder."""
    folder = tmp_path / case
    folder.mkdir()
    return write_card_model(folder)


def _edit_card(path: str, edit) -> None:
    card_path = Path(path).with_suffix(".json")
    card = json.loads(card_path.read_text())
    edit(card)
    card_path.write_text(json.dumps(card))


CARD_CASES = {
    "zero heads": (lambda p: _edit_card(p, lambda c: c["model_args"].update(num_heads=0)), "num_heads must be a whole"),
    "zero patch": (
        lambda p: _edit_card(p, lambda c: c["model_args"].update(patch_size=0)),
        "patch_size must be a whole",
    ),
    "wrong shapes": (
        lambda p: _edit_card(p, lambda c: c["model_args"].update(embed_dim=24)),
        "does not match the architecture: size mismatch",
    ),
    "unknown argument": (
        lambda p: _edit_card(p, lambda c: c["model_args"].update(bogus=1)),
        "its model_args cannot build a ViT (TypeError",
    ),
    "args not an object": (lambda p: _edit_card(p, lambda c: c.update(model_args=[1])), "model_args must be an object"),
    "bad input size": (lambda p: _edit_card(p, lambda c: c.update(input_size="x")), "input_size must be"),
    "zero std": (lambda p: _edit_card(p, lambda c: c.update(std=[0])), "std must not be 0"),
    "card not JSON": (
        lambda p: Path(p).with_suffix(".json").write_text("{oops"),
        "tiny.json is not valid JSON (line 1",
    ),
    "bad header": (lambda p: Path(p).write_bytes(b"\xff" * 8 + b"garbage"), "not a readable .safetensors file"),
    "cut short": (
        lambda p: Path(p).write_bytes(Path(p).read_bytes()[:200]),
        "not a readable .safetensors file",
    ),
}


@pytest.mark.parametrize("case", list(CARD_CASES))
def test_a_malformed_card_model_is_a_message(tmp_path, case):
    path = _card(tmp_path, case.replace(" ", "_"))
    corrupt, expected = CARD_CASES[case]
    corrupt(path)
    with pytest.raises(ModelLoadError) as err:
        vizapp.load_model(path, device="cpu")
    msg = str(err.value)
    assert expected in msg
    assert str(tmp_path) not in msg and "/" not in msg.split(";")[0]  # the file's name, never its folder
    assert any(w in msg for w in ("fix", "again", "pass the architecture"))  # says what to do


@pytest.mark.parametrize("kwargs", [{"num_heads": 0}, {"patch_size": 0}, {"embed_dim": -8}, {"img_size": (32, 0)}])
def test_zero_heads_or_patch_size_are_refused_by_name(tmp_path, kwargs):
    """A timm id, or a .safetensors file with arch=, built with zero heads or a zero patch: the message names the
    setting (it was a ZeroDivisionError, raw for a file or as "cannot build ... to check its size" for an id)."""
    key = next(iter(kwargs))
    with pytest.raises(ModelLoadError, match=f"{key} must be a whole number above zero"):
        vizapp.load_model("vit_tiny_patch16_224", pretrained=False, device="cpu", depth=1, **{"img_size": 32, **kwargs})
    import timm
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1).state_dict(), str(path))
    with pytest.raises(ModelLoadError, match=f"w.safetensors: {key} must be a whole number above zero"):
        vizapp.load_model(str(path), arch="vit_tiny_patch16_224", device="cpu", depth=1, **{"img_size": 32, **kwargs})


def test_an_argument_the_architecture_does_not_take_is_named():
    """A constructor argument the architecture lacks (Swin takes ``depths``, not ``depth``): the message gives the
    constructor's own words, which name the argument, not only the exception's type (it said "...: TypeError")."""
    import inspect

    import timm
    from timm.models.swin_transformer import SwinTransformer

    takes_any = inspect.Parameter.VAR_KEYWORD in {
        p.kind for p in inspect.signature(SwinTransformer).parameters.values()
    }
    if takes_any:  # timm before 1.0.31: Swin's constructor takes **kwargs and ignores an argument it does not know
        pytest.skip(f"timm {timm.__version__}'s SwinTransformer accepts any keyword argument and ignores `depth`")
    with pytest.raises(ModelLoadError) as err:
        vizapp.load_model("swin_tiny_patch4_window7_224", pretrained=False, device="cpu", depth=2)
    msg = str(err.value)
    assert msg.startswith("cannot build 'swin_tiny_patch4_window7_224' to check its size: TypeError: ")
    assert "unexpected keyword argument 'depth'" in msg
    assert "\n" not in msg and len(msg) < 320


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    folder = tmp_path_factory.mktemp("hf") / "vit"
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    return folder


def _edit_config(folder: Path, **fields) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(fields)
    (folder / "config.json").write_text(json.dumps(cfg))


HF_CASES = {
    "zero heads": (lambda f: _edit_config(f, num_attention_heads=0), "num_attention_heads must be a whole number"),
    "zero patch": (lambda f: _edit_config(f, patch_size=0), "patch_size must be a whole number above zero"),
    "wrong shapes": (
        lambda f: _edit_config(f, hidden_size=48),
        "tensors in another shape than config.json says",
    ),
    "heads do not divide the width": (  # transformers builds 3 heads of 10 for a width of 32
        lambda f: _edit_config(f, num_attention_heads=3),
        "tensors in another shape than config.json says",
    ),
    "bad header": (
        lambda f: (f / "model.safetensors").write_bytes(b"\xff" * 8 + b"garbage"),
        "weights could not be read (Error while deserializing header",
    ),
    "config not JSON": (lambda f: (f / "config.json").write_text("{oops"), "config.json is not valid JSON (line 1"),
    "custom code": (
        lambda f: _edit_config(f, auto_map={"AutoConfig": "configuration_x.XConfig"}),
        "asks to run Python code shipped with the model (auto_map)",
    ),
    "custom image processor": (
        lambda f: (f / "preprocessor_config.json").write_text(json.dumps({"auto_map": {"AutoImageProcessor": "p.P"}})),
        "its preprocessor_config.json asks to run Python code",
    ),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_a_malformed_transformers_folder_is_a_message(hf_folder, tmp_path, case):
    folder = tmp_path / "my_model"
    shutil.copytree(hf_folder, folder)
    corrupt, expected = HF_CASES[case]
    corrupt(folder)
    with pytest.raises(ModelLoadError) as err:
        vizapp.load_model(str(folder), device="cpu")
    msg = str(err.value)
    assert msg.startswith("my_model: ") and expected in msg
    assert str(tmp_path) not in msg and "/tmp" not in msg  # the folder's name, never its path


def test_the_complete_folder_loads(hf_folder):
    assert vizapp.load_model(str(hf_folder), device="cpu").source == "pretrained"


def _custom_code_folder(hf_folder: Path, folder: Path) -> Path:
    """A folder whose config names a model type transformers does not ship and the code that defines it; the code,
    if it ever runs, writes ``RAN`` beside itself."""
    shutil.copytree(hf_folder, folder)
    _edit_config(folder, model_type="evil_vit", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (folder / "configuration_evil.py").write_text(
        "import pathlib\n"
        "pathlib.Path(__file__).with_name('RAN').write_text('yes')\n"
        "from transformers import ViTConfig\n"
        "class EvilConfig(ViTConfig):\n"
        "    model_type = 'evil_vit'\n"
    )
    return folder


def test_the_cli_refuses_custom_code_before_transformers_asks(hf_folder, tmp_path, photo, capsys, monkeypatch):
    """transformers asks on the terminal whether to run a folder's own code (``auto_map``) and runs it on "y": the
    command refuses the folder before anything can ask, and never runs the code."""
    from vizapp import cli

    folder = _custom_code_folder(hf_folder, tmp_path / "evil")
    asked = []

    def answer_yes(prompt=""):
        asked.append(prompt)
        return "y"

    monkeypatch.setattr(builtins, "input", answer_yes)
    code = cli.main([photo, "--model", str(folder)])
    err = capsys.readouterr().err
    assert not asked, "transformers asked whether to run the folder's code"
    assert not (tmp_path / "evil" / "RAN").exists(), "the folder's own code ran"
    assert code == 2 and err.startswith("error: evil: its config.json asks to run Python code")
    assert str(tmp_path) not in err and "Traceback" not in err


def test_the_cli_says_what_is_wrong_with_a_malformed_checkpoint(tmp_path, photo, capsys):
    from vizapp import cli

    path = _card(tmp_path, "card")
    _edit_card(path, lambda c: c["model_args"].update(num_heads=0))
    assert cli.main([photo, "--model", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model card tiny.json: num_heads must be a whole number above zero, got 0; fix")


def test_the_operators_own_folder_is_not_refused_by_the_allow_list(hf_folder, monkeypatch):
    """SECURITY.md: the operator's own local files are not ids and the allow-list does not apply to them; the
    transformers adapter's size check used to refuse the folder, naming its path."""
    monkeypatch.setattr(B, "BUDGET", B.Budget(allowed=frozenset({"bundled"})))
    assert vizapp.load_model(str(hf_folder), device="cpu", num_hidden_layers=1).source == "pretrained"
    with pytest.raises(ModelTooLargeError, match="not one of the models this server offers"):
        vizapp.load_model("hf:someone/vit", device="cpu", allow_files=False)  # an id still is
