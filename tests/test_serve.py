"""`python -m bridgejax.serve`: the Gradio demo's handlers on tiny random backbones, and the server
itself on a toy-world run driven in headless Chromium (upload, click Caption, read the caption)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import tiny_eval_world as tw  # noqa: E402

from bridgejax import serve  # noqa: E402
from bridgejax.data.records import open_split  # noqa: E402
from bridgejax.inference import Hit, Pipeline  # noqa: E402

CHROMEDRIVER = "/usr/bin/chromedriver"  # Debian's chromium-driver: Selenium Manager never downloads one


@pytest.fixture(scope="module")
def pipe_and_images(tmp_path_factory):
  setup, trainable = tw.setup_and_params()
  pipe = Pipeline(setup, {**setup.frozen, **trainable}, name="tiny@3", max_new_tokens=5, batch_size=4)
  folder = str(tmp_path_factory.mktemp("images"))
  split = open_split(tw.world()["data"], "val")
  for i in range(4):
    with open(os.path.join(folder, f"img{i}.png"), "wb") as f:
      f.write(split[i]["image"])
  return pipe, folder


def test_handlers_are_the_pipelines_calls(pipe_and_images, monkeypatch):
  pipe, folder = pipe_and_images
  image = os.path.join(folder, "img0.png")
  index = pipe.build_index(folder)
  demo = serve.Demo(pipe, index)
  assert demo.caption(image, "") == pipe.caption(image)
  assert demo.ask(image, "what colour is the square?") == pipe.answer(image, "what colour is the square?")
  by_text = demo.search("a red circle", None, 3)
  assert by_text == [(h.path, f"{os.path.basename(h.path)}  {h.score:.3f}") for h in pipe.retrieve("a red circle", index, 3)]
  composed = demo.search("but blue", image, 3)
  assert [p for p, _ in composed] == [h.path for h in pipe.retrieve_composed(image, "but blue", index, 3)]
  assert image not in [p for p, _ in composed]  # the query image is left out
  hit = Hit(os.path.join(folder, "img2.png"), 0.25)
  monkeypatch.setattr(pipe, "generate", lambda prompt, image=None, index=None: ["a red", hit, "circle"])
  history = demo.chat("Q: show me a circle\nA:", None, [{"role": "user", "content": "hi"}])
  assert history[0] == {"role": "user", "content": "hi"}
  assert history[1:] == [{"role": "user", "content": "Q: show me a circle\nA:"},
                         {"role": "assistant", "content": "a red"},
                         {"role": "assistant", "content": {"path": hit.path, "alt_text": "img2.png 0.250"}},
                         {"role": "assistant", "content": "circle"}]


def test_missing_inputs_and_index_are_messages_not_tracebacks(pipe_and_images):
  pipe, _ = pipe_and_images
  demo = serve.Demo(pipe, None)
  with pytest.raises(ValueError, match="upload an image first"):
    demo.caption(None)
  with pytest.raises(ValueError, match="--index FOLDER"):
    demo.search("a red circle")
  with pytest.raises(ValueError, match="type a question"):
    demo.ask("x.png", " ")


def test_build_app_makes_the_tabs_and_shows_user_errors_as_messages(pipe_and_images):
  gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[demo]')")
  app = serve.build_app(pipe_and_images[0], None)  # no server
  handlers = {block.fn.__name__: block.fn for block in app.fns.values()}
  assert {"caption", "ask", "search", "chat"} <= set(handlers)
  assert [t.label for t in app.blocks.values() if isinstance(t, gr.Tab)] == ["Caption", "Ask", "Search", "Chat"]
  with pytest.raises(gr.Error, match="no image index"):
    handlers["search"]("a red circle", None, 5)


def test_without_gradio_the_cli_says_how_to_install_it(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "gradio", None)  # importlib.util.find_spec("gradio") -> None
  assert serve.main(["--workdir", tw.workdir_with_checkpoint()]) == 2
  assert capsys.readouterr().err.strip().splitlines() == [
      "error: the web demo needs gradio, which is not installed: pip install -e '.[demo]'"]


def test_the_server_may_serve_the_index_images_and_nothing_else(pipe_and_images, tmp_path, monkeypatch):
  """Images in folders far apart: Gradio gets exactly their files, never a folder above them (it was '/')."""
  gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[demo]')")
  pipe, folder = pipe_and_images
  elsewhere = tmp_path / "far" / "away"
  elsewhere.mkdir(parents=True)
  shutil.copy(os.path.join(folder, "img0.png"), elsewhere / "x.png")
  paths = [os.path.join(folder, "img1.png"), str(elsewhere / "x.png"), os.path.join(folder, "img2.png")]
  index = pipe.build_index(paths)
  monkeypatch.setattr(serve, "load", lambda a: (pipe, index))
  launched = []
  monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.append(kw))
  assert serve.main(["--workdir", "unused", "--host", "0.0.0.0", "--index", "unused"]) == 0
  [kw] = launched
  assert kw["server_name"] == "0.0.0.0" and kw["allowed_paths"] == sorted(paths)
  assert all(os.path.isfile(p) for p in kw["allowed_paths"])
  monkeypatch.setattr(serve, "load", lambda a: (pipe, None))
  assert serve.main(["--workdir", "unused"]) == 0 and launched[-1]["allowed_paths"] == []


def test_load_takes_an_exported_folder_too(tmp_path):
  from bridgejax import export
  out = str(tmp_path / "bridge")
  assert export.main(["--workdir", tw.workdir_with_checkpoint(), "--out", out]) == 0
  parse = serve._parser().parse_args
  pipe, index = serve.load(parse(["--pretrained", out]))
  assert pipe.name == "tiny@3" and len(index) == 6  # a toy run: the 6 held-out images of its retrieval eval
  with pytest.raises(ValueError, match="--checkpoint goes with --workdir"):
    serve.load(parse(["--pretrained", out, "--checkpoint", "best"]))


def test_toy_run_indexes_its_held_out_images():
  data = tw.world()["data"]
  names = lambda split: sorted(f"{r['id']}.png" for r in open_split(data, split))
  assert sorted(os.listdir(serve.toy_index_folder(tw.config()))) == names("val-images")  # the retrieval eval's
  config = tw.config()
  config.evals.retrieval.data = tw.world()["clip"]  # not a dataset: the run's toy dataset's test images
  assert sorted(os.listdir(serve.toy_index_folder(config))) == names("test-images")
  config.data.dir = tw.world()["gemma"]
  assert serve.toy_index_folder(config) is None  # no toy data: --index or no Search


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if server.poll() is not None:
      raise AssertionError(f"the server exited with {server.returncode}:\n{server.stdout.read()}")
    try:
      with urllib.request.urlopen(url, timeout=5):
        return
    except OSError:
      time.sleep(1)
  raise AssertionError(f"no answer from {url} in {timeout} s")


def require_browser() -> str:
  """Debian's chromium (its path), chromium-driver, gradio and selenium, or the test skips naming them."""
  pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[demo]')")
  pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[demo]')")
  chromium = shutil.which("chromium") or shutil.which("chromium-browser")
  if chromium is None or not os.path.exists(CHROMEDRIVER):
    pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)")
  return chromium


def browser(window: str = "1280,900"):
  """Headless Debian chromium under Selenium, with Debian's chromedriver."""
  chromium = require_browser()
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  options.binary_location = chromium
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--window-size={window}", "--hide-scrollbars"):
    options.add_argument(arg)
  return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def caption_in_browser(url: str, image: str, screenshot: str, timeout: float = 120) -> str:
  """Open the demo at `url`, upload `image` in the Caption tab, click Caption, wait for the
  caption, save a screenshot; returns the caption the page shows."""
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support import expected_conditions as ec
  from selenium.webdriver.support.ui import WebDriverWait
  driver = browser()
  try:
    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#caption-button")))
    driver.find_elements(By.CSS_SELECTOR, "input[type=file]")[0].send_keys(os.path.abspath(image))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "img[src*='/file='], img[src*='gradio_api/file']"))
    driver.find_element(By.CSS_SELECTOR, "#caption-button").click()
    output = "#caption-output textarea"
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, output).get_attribute("value"))
    caption = driver.find_element(By.CSS_SELECTOR, output).get_attribute("value")
    driver.save_screenshot(screenshot)
    return caption
  finally:
    driver.quit()


def test_server_captions_an_upload_in_headless_chromium(pipe_and_images, tmp_path):
  require_browser()  # before the server starts
  workdir = tw.workdir_with_checkpoint()  # the tiny toy-world run: Search indexes its held-out images
  port = _free_port()
  server = subprocess.Popen([sys.executable, "-m", "bridgejax.serve", "--workdir", workdir, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
  try:
    url = f"http://127.0.0.1:{port}/"
    _wait_for(url, server)
    image = os.path.join(pipe_and_images[1], "img1.png")
    shot = str(tmp_path / "serve.png")
    caption = caption_in_browser(url, image, shot)
  finally:
    server.terminate()
    server.wait(timeout=30)
  from bridgejax.predict import load_pipeline
  assert caption == load_pipeline(workdir).caption(image)
  from PIL import Image
  assert Image.open(shot).size[0] >= 1000
