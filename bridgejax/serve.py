"""A web demo of a trained bridge: a Gradio app over bridgejax.inference.Pipeline.

    pip install -e '.[demo]'
    python -m bridgejax.serve --workdir RUN [--checkpoint best|N] [--index FOLDER|index.npz]
                              [--port 7860] [--host 127.0.0.1]
    python -m bridgejax.serve --pretrained DIR_OR_HUB_ID [--vision DIR] [--llm DIR] [--index ...]

Each tab is one Pipeline call; the app only converts inputs and outputs:
  Caption  an uploaded image (and an optional prompt such as "A picture of") -> Pipeline.caption
  Ask      an image and a question -> Pipeline.answer
  Search   a text (Pipeline.retrieve), or an image and a text (Pipeline.retrieve_composed) -> the
           index's best k images with their cosine scores
  Chat     a prompt, with an image or not -> Pipeline.generate: the text, with the index image
           fetched at each [RET] shown in its place (each message is a prompt of its own)

The index is --index (a folder, embedded at start, or an index.npz from `python -m
bridgejax.predict index`). Without it a toy-world run indexes the held-out images its retrieval
eval reads; for any other run Search says to pass --index and Chat shows [RET] without images.
An index image that cannot be read is left out, with one warning line naming it. The server serves
exactly the index's image files (and the uploads), never the folders that hold them, so --host
0.0.0.0 exposes nothing else. `build_app(pipeline, index)` makes the app without starting a server.
Errors before the server starts are one line, as in the other CLIs (bridgejax.cli); in the app they
show as a message.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib.util
import io
import os
import shutil
import sys
import tempfile
import threading

from PIL import Image

from bridgejax import cli
from bridgejax.errors import UserError
from bridgejax.predict import load_index, load_pipeline

NO_INDEX = "no image index: start the demo with --index FOLDER (or an index.npz from python -m bridgejax.predict index)"
SYSTEM_FONTS = (["ui-sans-serif", "system-ui", "sans-serif"], ["ui-monospace", "monospace"])  # nothing fetched


class Demo:
  """The app's handlers: Pipeline calls, one at a time, in the shapes Gradio's components take."""

  def __init__(self, pipeline, index=None):
    self.pipeline, self.index = pipeline, index
    self._lock = threading.Lock()  # one request at a time on the model

  def caption(self, image, prompt: str = "") -> str:
    with self._lock:
      return self.pipeline.caption(_required(image), prompt or "")

  def ask(self, image, question: str) -> str:
    if not (question or "").strip():
      raise UserError("type a question about the image")
    with self._lock:
      return self.pipeline.answer(_required(image), question)

  def search(self, text: str, image=None, k: int = 5) -> list[tuple[str, str]]:
    """(image path, "name  score") of the best k: by the text, or by the image changed by the text."""
    if self.index is None:
      raise UserError(NO_INDEX)
    with self._lock:
      hits = (self.pipeline.retrieve_composed(image, text or "", self.index, int(k)) if image is not None
              else self.pipeline.retrieve(_required_text(text), self.index, int(k)))
    return [(hit.path, f"{os.path.basename(hit.path)}  {hit.score:.3f}") for hit in hits]

  def chat(self, message: str, image, history: list | None) -> list[dict]:
    """The history with the user's turn and the answer, one message per text segment or image."""
    from bridgejax.inference import Hit  # lazy: jax and the models, seconds of CLI start
    with self._lock:
      segments = self.pipeline.generate(_required_text(message), image=image, index=self.index)
    turn = [{"role": "user", "content": message}]
    if image is not None:
      turn.append({"role": "user", "content": {"path": image}})
    for segment in segments or ["(nothing generated)"]:
      content = ({"path": segment.path, "alt_text": f"{os.path.basename(segment.path)} {segment.score:.3f}"}
                 if isinstance(segment, Hit) else segment)
      turn.append({"role": "assistant", "content": content})
    return list(history or []) + turn


def _required(image):
  if image is None:
    raise UserError("upload an image first")
  return image


def _required_text(text: str) -> str:
  if not (text or "").strip():
    raise UserError("type a text first")
  return text


def require_gradio() -> None:
  if importlib.util.find_spec("gradio") is None:
    raise UserError("the web demo needs gradio, which is not installed: pip install -e '.[demo]'")


def build_app(pipeline, index=None):
  """The Gradio Blocks app (not started): tabs Caption, Ask, Search and Chat over `pipeline`."""
  require_gradio()
  import gradio as gr  # lazy: gradio is optional (.[demo])
  demo = Demo(pipeline, index)

  def shown(fn):
    """A user error (no image, a prompt too long for the context) as Gradio's message, not a traceback."""
    @functools.wraps(fn)
    def call(*args):
      try:
        return fn(*args)
      except (ValueError, OSError) as e:
        raise gr.Error(cli.one_line(e)) from e
    return call

  image = lambda label="Image": gr.Image(type="filepath", label=label, sources=["upload", "clipboard"])

  def image_to_text(name: str, handler, text_label: str, placeholder: str, output_label: str) -> None:
    """A tab: an image and a text in, the handler's text out (#<name>-button, #<output>-output)."""
    with gr.Tab(name), gr.Row():
      with gr.Column():
        inputs = [image(), gr.Textbox(label=text_label, placeholder=placeholder)]
        button = gr.Button(name, variant="primary", elem_id=f"{name.lower()}-button")
      output = gr.Textbox(label=output_label, interactive=False, elem_id=f"{output_label.lower()}-output")
      for event in (button.click, inputs[1].submit):
        event(shown(handler), inputs, output)

  with gr.Blocks(title="bridgejax", analytics_enabled=False) as app:
    gr.Markdown(f"## bridgejax: {pipeline.name or 'a trained bridge'}"
                + (f"  ·  index: {len(index)} images" if index is not None else "  ·  no image index"))
    image_to_text("Caption", demo.caption, "Prompt (optional)", "A picture of", "Caption")
    image_to_text("Ask", demo.ask, "Question", "what colour is the square?", "Answer")
    with gr.Tab("Search"), gr.Row():
      with gr.Column():
        gr.Markdown("A text finds images; an image and a text find images like it, changed as the text says."
                    if index is not None else NO_INDEX)
        query = gr.Textbox(label="Text", placeholder="a red circle")
        query_image = image("Image (optional: composed retrieval)")
        k = gr.Slider(1, 20, value=5, step=1, label="k")
        search_button = gr.Button("Search", variant="primary", elem_id="search-button")
      gallery = gr.Gallery(label="Results (cosine score)", columns=3, elem_id="search-results")
      search_button.click(shown(demo.search), [query, query_image, k], gallery)
      query.submit(shown(demo.search), [query, query_image, k], gallery)
    with gr.Tab("Chat"), gr.Row():
      with gr.Column():
        message = gr.Textbox(label="Prompt", placeholder="a picture of")
        chat_image = image("Image (optional)")
        chat_button = gr.Button("Send", variant="primary", elem_id="chat-button")
      chatbot = gr.Chatbot(label="Interleaved output: each [RET] fetches an image from the index", elem_id="chat")
      chat_button.click(shown(demo.chat), [message, chat_image, chatbot], chatbot)
  return app


def toy_index_folder(config) -> str | None:
  """A toy-world run's held-out images, written as files to a temporary folder (removed at exit):
  the image table its retrieval eval reads, else its dataset's test images; None for other data."""
  from bridgejax.data.records import INFO_FILE, load_info, open_split  # lazy: bridgejax.data, ~0.1 s of CLI start
  retrieval = [(t.get("data"), t.get("split")) for t in (config.get("evals") or {}).values()
               if t.get("type") == "retrieval"]
  for data, split in retrieval + [(config.data.dir, "test")]:
    if not data or not os.path.isfile(os.path.join(data, INFO_FILE)):
      continue
    info = load_info(data)
    if info.get("source") != "toy" or not info["splits"].get(split, {}).get("num_examples"):
      continue
    images = open_split(data, split)
    images = images.images or images
    folder = tempfile.mkdtemp(prefix="bridgejax-serve-toy-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for i in range(len(images)):
      record = images[i]
      suffix = Image.open(io.BytesIO(record["image"])).format.lower()
      with open(os.path.join(folder, f"{record['id']}.{suffix}"), "wb") as f:
        f.write(record["image"])
    return folder
  return None


def allowed_paths(index) -> list[str]:
  """What Gradio may serve besides uploads: exactly the index's image files (absolute), never a folder:
  with --host 0.0.0.0 a folder would serve every file under it that this process can read."""
  return sorted({os.path.abspath(p) for p in index.paths}) if index is not None else []


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m bridgejax.serve", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a training run's directory (checkpoints/, config.json)")
  source.add_argument("--pretrained", help="a folder from python -m bridgejax.export, or its Hub id (org/name)")
  p.add_argument("--checkpoint", default=None, help="with --workdir: a step, or 'best' (default: the latest)")
  p.add_argument("--vision", default=None, help="with --pretrained: the vision backbone's folder")
  p.add_argument("--llm", default=None, help="with --pretrained: the LLM backbone's folder")
  p.add_argument("--index", default=None, help="a folder of images or an index .npz for Search and Chat "
                 "(default: a toy run's held-out images)")
  p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
  p.add_argument("--port", type=int, default=7860)
  p.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
  return p


def load(a):
  """(pipeline, index or None) as the flags say."""
  from bridgejax.inference import Pipeline  # lazy: jax and the models, seconds of CLI start
  if a.workdir is not None:
    if a.vision or a.llm:
      raise UserError("--vision and --llm go with --pretrained; a run's own config names its backbones")
    pipe = load_pipeline(a.workdir, None, a.checkpoint)
  else:
    if a.checkpoint is not None:
      raise UserError("--checkpoint goes with --workdir; an exported folder holds one checkpoint")
    pipe = Pipeline.from_pretrained(a.pretrained, vision=a.vision, llm=a.llm)
  where = a.index or toy_index_folder(pipe.setup.config)
  if where is None:
    print(f"note: {NO_INDEX}; Search is off and Chat shows [RET] without images", file=sys.stderr)
    return pipe, None
  return pipe, load_index(pipe, where)


def main(argv=None) -> int:
  argv, debug = cli.pop_debug(sys.argv[1:] if argv is None else argv)
  a = _parser().parse_args(argv)

  def go() -> int:
    require_gradio()  # before minutes of loading weights
    pipe, index = load(a)
    app = build_app(pipe, index)
    import gradio as gr  # lazy: gradio is optional (.[demo])
    font, mono = SYSTEM_FONTS
    app.launch(server_name=a.host, server_port=a.port, allowed_paths=allowed_paths(index), show_error=True,
               theme=gr.themes.Default(font=font, font_mono=mono))
    return 0
  return cli.call(go, debug=debug)


if __name__ == "__main__":
  sys.exit(main())
