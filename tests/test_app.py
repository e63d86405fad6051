"""The Gradio app on 127.0.0.1: gradio_client requests, bad inputs, and one headless-browser run."""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import socket
from pathlib import Path

import pytest

from test_inference import IMAGE_IDS, _one_thread, _shape_image, build_tiny_checkpoint  # noqa: F401
from vqa_align.errors import UserError
from vqa_align.serve.predictor import Predictor

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

CHROMIUM = "/usr/bin/chromium"
# Gradio's queue uses pandas APIs that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """The app with a tiny random checkpoint (and itself as comparison), served in a thread."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from vqa_align_app.main import build_app, launch_kwargs

    root = tmp_path_factory.mktemp("app")
    ckpt = build_tiny_checkpoint(root / "main")
    other = build_tiny_checkpoint(root / "other", method="none", seed=1)
    loader = lambda i: _shape_image(i) if i in IMAGE_IDS else None  # noqa: E731
    predictor = Predictor(ckpt, image_loader=loader)
    demo = build_app(predictor)
    demo.queue(default_concurrency_limit=2)
    port = _free_port()
    demo.launch(**launch_kwargs("127.0.0.1", port), prevent_thread_lock=True)
    try:
        yield dict(url=f"http://127.0.0.1:{port}/", demo=demo, ckpt=ckpt, other=other, root=root, predictor=predictor)
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(app_server):
    return gradio_client.Client(app_server["url"], verbose=False)


def _answer(client, question="what shape is in the image?", image_id=1, upload=None, compare="", **sel):
    args = dict(kind="sga_guided", layer=1, head=0, metric="mmd2", shading="glimpse",
                focus="all words (glimpse-weighted)")
    args.update(sel)
    return client.predict(question, image_id, upload, compare, *args.values(), api_name="/answer")


def _is_png_plot(value) -> bool:
    """A gr.Plot output as the client sees it: {"type": "matplotlib", "plot": "data:image/png;base64,..."}."""
    if not isinstance(value, dict) or value.get("type") != "matplotlib":
        return False
    header, _, data = value["plot"].partition(",")
    return header.startswith("data:image/png") and base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"


def test_binds_to_localhost(app_server):
    assert app_server["demo"].server_name == "127.0.0.1"


def test_page_answers_on_load(app_server):
    """The load event runs the Answer button's handler, so the prefilled question is answered at once."""
    demo = app_server["demo"]
    config = demo.get_config_file()
    on_load = [i for i, d in enumerate(config["dependencies"]) if any(t[1] == "load" for t in d["targets"])]
    on_click = [i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == "answer"]
    assert len(on_load) == 1 and len(on_click) == 1
    load_fn, click_fn = demo.fns[on_load[0]], demo.fns[on_click[0]]
    assert load_fn.fn == click_fn.fn
    assert [b._id for b in load_fn.inputs] == [b._id for b in click_fn.inputs]
    assert [b._id for b in load_fn.outputs] == [b._id for b in click_fn.outputs]


def test_answer_with_all_figures(client):
    out = _answer(client)
    message, label, focus, region, words, projection, grid, matrix, caption = out[:9]
    assert not message.startswith("⚠️")
    assert label["label"] and len(label["confidences"]) == 5
    assert sum(c["confidence"] for c in label["confidences"]) <= 1.0 + 1e-6
    for plot in (region, projection, grid, matrix):
        assert _is_png_plot(plot)
    tokens = [w["token"] for w in words if w["class_or_confidence"] is not None]
    assert tokens == ["what", "shape", "is", "in", "the", "image"]
    assert "layer 1 · head 0" in caption
    # Re-drawing another head of the same prediction (no model call, session state).
    view = client.predict("sa_question", 0, 3, "ct", "guided", "1: shape", api_name="/view")
    assert all(_is_png_plot(p) for p in (view[1], view[3], view[4], view[5]))
    assert "question self-attention" in view[6] and "layer 0 · head 3" in view[6]


def test_bad_inputs_give_messages_and_the_app_keeps_serving(client, tmp_path):
    out = _answer(client, question="   ")
    assert out[0].startswith("⚠️") and "question" in out[0] and not out[1]
    out = _answer(client, image_id=None)
    assert out[0].startswith("⚠️") and "gallery" in out[0]
    out = _answer(client, image_id=987654)
    assert "not in the feature store" in out[0]
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    out = _answer(client, upload=gradio_client.handle_file(str(text)), image_id=None)
    assert out[0].startswith("⚠️") and "not an image file" in out[0]
    out = _answer(client, question="what zebra " + "shape " * 498)
    assert "“zebra”" in out[0] and "500 words" in out[0] and out[1]["label"]
    out = _answer(client, compare="/nonexistent/checkpoint")
    assert out[1]["label"] and "Comparison model" in out[0] and "not found" in out[0]
    assert not _answer(client)[0].startswith("⚠️")  # still serving


def test_unexpected_error_is_a_message_not_a_traceback(client, app_server, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(app_server["predictor"], "answer", broken)
    out = _answer(client)
    assert out[0].startswith("⚠️ **Internal error (RuntimeError: boom)") and "Traceback" not in out[0]
    monkeypatch.undo()
    assert not _answer(client)[0].startswith("⚠️")  # the next request is served


def test_upload_grayscale(client, tmp_path):
    from PIL import Image

    path = tmp_path / "gray.png"
    Image.fromarray(_shape_image(1)).convert("L").save(path)
    out = _answer(client, upload=gradio_client.handle_file(str(path)), image_id=None)
    assert "grayscale" in out[0] and out[1]["label"]


def test_compare_checkpoint(client, app_server, tmp_path):
    status = client.predict(str(app_server["other"]), api_name="/load_compare")
    assert status.startswith("✅")
    out = _answer(client, compare=str(app_server["other"]))
    cmp_label, cmp_region, cmp_projection, cmp_grid = out[9:13]  # states and layout are not API outputs
    assert cmp_label["label"] and all(_is_png_plot(p) for p in (cmp_region, cmp_projection, cmp_grid))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(app_server["other"], corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 10)
    status = client.predict(str(corrupt), api_name="/load_compare")
    assert status.startswith("⚠️") and "cannot read weights" in status


def test_run_demo_without_checkpoint_names_the_command(monkeypatch, tmp_path):
    from vqa_align_app.main import run_demo

    monkeypatch.setenv("VQA_ALIGN_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="vqa-align quickstart"):
        run_demo(argparse.Namespace(checkpoint=None, compare=None, host="127.0.0.1", port=0))


@pytest.mark.browser
def test_browser_end_to_end(app_server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(app_server["url"], wait_until="domcontentloaded")
            # Answered on load: the prefilled question about the first example, every panel drawn.
            page.locator("#answer").get_by_text("%").first.wait_for(timeout=20_000)
            for panel in ("region", "projection", "grid", "matrix"):
                page.locator(f"#{panel} img").wait_for(timeout=20_000)
            page.locator("#gallery button.thumbnail-item").nth(2).click()  # the third example image
            page.wait_for_function("document.querySelector('#image-id input').value === '2'", timeout=15_000)
            box = page.locator("#question textarea")
            box.fill("what color is the shape?")
            page.locator("#ask").click()
            page.locator("#answer").get_by_text("%").first.wait_for(timeout=20_000)
            page.locator("#projection img").wait_for(timeout=20_000)
            assert page.locator("#projection img").get_attribute("src").startswith("data:image/png")
            assert page.locator("#answer").inner_text().strip()
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000


# ---- the API as a script calls it; comparison models; server paths ------------------------------


def test_api_inputs_but_the_question_are_optional(client, app_server):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    answer = {p["parameter_name"]: p["parameter_has_default"] for p in api["/answer"]["parameters"]}
    assert answer.pop("question") is True  # the first example's question is the default too
    assert answer and all(answer.values()), answer
    assert all(p["parameter_has_default"] for p in api["/load_compare"]["parameters"])
    # A script passes only what it needs, by name.
    out = client.predict(question="what shape is in the image?", image_id=2, api_name="/answer")
    assert not out[0].startswith("⚠️") and out[1]["label"]
    out = client.predict(question="what color is the shape?", api_name="/answer")  # the first example's image
    assert not out[0].startswith("⚠️") and out[1]["label"]
    out = client.predict(question="what shape?", image_id=1, head=2, api_name="/answer")
    assert "head 2" in out[8]
    assert client.predict(api_name="/load_compare") == "Comparison off."


def test_messages_do_not_show_server_paths(client, app_server):
    out = _answer(client, image_id=987654)
    assert "not in the feature store features.h5" in out[0]
    assert str(app_server["root"]) not in out[0] and "/" not in out[0]
    status = client.predict(str(app_server["root"] / "nowhere"), api_name="/load_compare")
    assert status.startswith("⚠️") and "not found" in status and str(app_server["root"]) not in status


def test_public_text():
    from vqa_align_app.handlers import public_text

    assert public_text("Image 3 is not in /home/u/.cache/vqa_align/easy_vqa/features.h5.") == \
        "Image 3 is not in features.h5."
    assert public_text("read ~/.cache/x/y.h5 and '/a/b/c' (see /etc)") == "read y.h5 and 'c' (see /etc)"
    assert public_text("runs/easy_vqa/checkpoints/last at http://127.0.0.1:7860/x") == \
        "runs/easy_vqa/checkpoints/last at http://127.0.0.1:7860/x"


def test_one_comparison_model_per_checkpoint_and_tab(app_server):
    import gc

    models = app_server["demo"].compare_models
    other = app_server["other"]
    run = other.parent.parent  # the run folder: its checkpoint is checkpoints/best
    spellings = [str(other), f"{other}/", str(run), f"{run}//checkpoints/./best", f"{other}/../best",
                 f"  {other}  "] + [f"{other}" + "/." * i for i in range(1, 15)]

    def held(path):  # comparison models of that checkpoint in memory
        gc.collect()
        return [k[0] for k in list(models._shared.keys())].count(path.resolve())

    tab = gradio_client.Client(app_server["url"], verbose=False)  # a fresh browser tab (session)
    for path in spellings:
        assert tab.predict(path, api_name="/load_compare").startswith("✅")
    assert len(spellings) == 20 and held(other) == 1  # 20 spellings, one model
    # The tab switches to another checkpoint, answers with it, then turns comparison off.
    third = build_tiny_checkpoint(app_server["root"] / "third", method="gan", seed=2)
    assert tab.predict(str(third), api_name="/load_compare").startswith("✅")
    out = _answer(tab, compare=str(third))
    assert out[9]["label"] and held(third) == 1  # answered by the tab's comparison model
    assert tab.predict("", api_name="/load_compare") == "Comparison off."
    assert held(third) == 0  # no tab holds it any more: freed


def test_compare_models_unit(tmp_path):
    """The cache itself: shared by resolved path, freed when no tab holds it, reloaded when rewritten."""
    import gc
    import time as _time

    from vqa_align_app.handlers import CompareModels

    ckpt = build_tiny_checkpoint(tmp_path / "a")
    models = CompareModels()
    tab_one = models.get(str(ckpt))
    tab_two = models.get(str(ckpt.parent.parent))  # the run folder
    assert tab_one[1] is tab_two[1] and len(models) == 1
    assert models.get(f"{ckpt}/.", tab_one) is tab_one
    del tab_two
    gc.collect()
    assert len(models) == 1  # tab one still holds it
    del tab_one
    gc.collect()
    assert len(models) == 0  # no tab holds it: freed
    held = models.get(str(ckpt))
    _time.sleep(0.01)
    (ckpt / "model.safetensors").touch()  # training rewrote the checkpoint
    assert models.get(str(ckpt), held)[1] is not held[1]
    with pytest.raises(Exception, match="checkpoint not found"):
        models.get(str(tmp_path / "missing"))


def test_demo_refuses_a_busy_port_or_a_bad_host_before_loading(tmp_path, capsys):
    from vqa_align.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        missing = str(tmp_path / "no-checkpoint")  # never reached: the address is checked first
        assert main(["demo", "--checkpoint", missing, "--port", str(port)]) == 2
        assert capsys.readouterr().err == f"vqa-align demo: error: --port {port}: already in use on 127.0.0.1; pick another port\n"
    assert main(["demo", "--checkpoint", missing, "--host", "999.1.1.1", "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vqa-align demo: error: --host '999.1.1.1': not an address of this machine") and err.count("\n") == 1
