"""The method lives in docs/: no external spec, no dead pointers into docs/.

Every tracked text file is scanned. None may cite the external method
specification the project was started from (a file that is not part of the
repository), and every pointer into the documentation must resolve: a path
such as ``docs/bounds.md#units`` anywhere (code, comments, configs, prose),
and every relative Markdown link in a ``.md`` file, must name a file that
exists and, with ``#anchor``, a heading of that file.
"""

import contextlib
import functools
import io
import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Split so that this file does not match its own pattern.
_SPEC = "SP" + "EC"
FORBIDDEN = re.compile(
    rf"\b{_SPEC}\b|(?<![a-z]){_SPEC.lower()}[ _](?:§|\d)")
# A docs/ path with a file extension, optionally with an anchor.
DOCS_PATH = re.compile(r"(?<![\w./-])(docs/[\w./-]*\.(?:md|png))(#[\w-]+)?")
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", ".pytest_cache",
             ".hypothesis"}


def _tracked_files() -> list[pathlib.Path]:
  try:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                         capture_output=True).stdout
    names = [n for n in out.decode().split("\0") if n]
  except (OSError, subprocess.CalledProcessError):  # Not a git checkout.
    names = []
    for folder, dirs, files in os.walk(ROOT):
      dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
      names += [str(pathlib.Path(folder, f).relative_to(ROOT)) for f in files]
  return [ROOT / n for n in sorted(names) if (ROOT / n).is_file()]


@functools.cache
def _texts() -> dict[pathlib.Path, str]:
  texts = {}
  for path in _tracked_files():
    try:
      texts[path] = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
      continue  # Images and other binary files.
  return texts


def _slug(heading: str) -> str:
  """GitHub's anchor for a Markdown heading."""
  text = heading.strip().replace("`", "").lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


@functools.cache
def _anchors(path: pathlib.Path) -> frozenset[str]:
  """The anchors of a Markdown file's headings (code blocks skipped)."""
  anchors, seen, fenced = set(), {}, False
  for line in path.read_text(encoding="utf-8").splitlines():
    if line.lstrip().startswith("```"):
      fenced = not fenced
      continue
    match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
    if fenced or not match:
      continue
    slug = _slug(match.group(1))
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    anchors.add(slug if count == 0 else f"{slug}-{count}")
  return frozenset(anchors)


def _dead_link(target: pathlib.Path, anchor: str | None) -> str | None:
  """Why ``target#anchor`` does not resolve, or None if it does."""
  if not target.exists():
    return "no such file"
  if anchor and target.suffix == ".md" and anchor not in _anchors(target):
    return f"no heading with anchor #{anchor}"
  return None


def _pointers(path: pathlib.Path, text: str):
  """``(line, written, target, anchor)`` for every pointer into the docs."""
  for number, line in enumerate(text.splitlines(), 1):
    for match in DOCS_PATH.finditer(line):
      anchor = match.group(2)[1:] if match.group(2) else None
      yield number, match.group(0), ROOT / match.group(1), anchor
    if path.suffix != ".md":
      continue
    for match in MD_LINK.finditer(line):
      link = match.group(1)
      if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
        continue
      file_part, _, anchor = link.partition("#")
      target = (path.parent / file_part).resolve() if file_part else path
      yield number, link, target, anchor or None


def test_no_file_cites_the_external_spec():
  hits = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
          for path, text in _texts().items()
          for number, line in enumerate(text.splitlines(), 1)
          if FORBIDDEN.search(line)]
  assert not hits, (
      "These lines cite a document outside the repository; point into "
      "docs/ instead:\n" + "\n".join(hits))


def test_every_pointer_into_the_docs_resolves():
  dead = []
  for path, text in _texts().items():
    for number, written, target, anchor in _pointers(path, text):
      why = _dead_link(target, anchor)
      if why:
        dead.append(f"{path.relative_to(ROOT)}:{number}: {written} ({why})")
  assert not dead, "Dead links into the docs:\n" + "\n".join(dead)


def test_the_method_is_documented():
  # The pages the README sends a newcomer to, with the sections code cites.
  for name, anchor in [("bounds.md", "loop-transformed-bound"),
                       ("bounds.md", "pairwise-last-step"),
                       ("bounds.md", "large-class-fallback"),
                       ("bounds.md", "units"),
                       ("bounds.md", "worked-examples"),
                       ("residual.md", "never-worse-than-naive"),
                       ("residual.md", "worked-example"),
                       ("residual.md", "rounding"),
                       ("training.md", "crm-loss"),
                       ("training.md", "recipes"),
                       ("certificates.md", "failing-closed")]:
    assert anchor in _anchors(ROOT / "docs" / name), (name, anchor)
  assert "docs/README.md" in _texts()[ROOT / "README.md"]
  assert "(residual.md)" in _texts()[ROOT / "docs" / "README.md"]


def _worked_example(page: str) -> tuple[str, str]:
  """The Python snippet of a page's worked example and what it prints.

  The printed lines are the indented block that follows "prints".
  """
  section = page.split("\n## Worked example\n", 1)[1].split("\n## ", 1)[0]
  code = section.split("```python\n", 1)[1].split("```", 1)[0]
  after = section.split("\nprints\n\n", 1)[1]
  printed = []
  for line in after.splitlines():
    if not line.startswith("    "):
      break
    printed.append(line[4:])
  return code, "\n".join(printed)


def test_residual_worked_example_prints_what_the_page_says():
  # The hand-computed numbers of docs/residual.md, recomputed by the code.
  code, expected = _worked_example(
      (ROOT / "docs" / "residual.md").read_text(encoding="utf-8"))
  program = compile(code, "docs/residual.md", "exec")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(program, {})  # pylint: disable=exec-used
  assert out.getvalue().strip() == expected.strip()


@pytest.mark.parametrize("heading, anchor", [
    ("Loop-transformed bound", "loop-transformed-bound"),
    ("Power iteration (training)", "power-iteration-training"),
    ("The network as a chain of linear maps",
     "the-network-as-a-chain-of-linear-maps"),
    ("`lipjax.bound` and `x_k`", "lipjaxbound-and-x_k"),
])
def test_slug_follows_github(heading, anchor):
  assert _slug(heading) == anchor


def test_checker_catches_dead_links_and_citations(tmp_path):
  page = tmp_path / "page.md"
  page.write_text("# Title\n\n## A section\n\n```\n# not a heading\n```\n")
  assert _anchors(page) == {"title", "a-section"}
  assert _dead_link(page, "a-section") is None
  assert _dead_link(page, "not-a-heading") == (
      "no heading with anchor #not-a-heading")
  assert _dead_link(tmp_path / "missing.md", None) == "no such file"
  written = [w for _, w, _, _ in _pointers(
      page, "see docs/bounds.md#units and [x](page.md#title) "
      "and [y](https://example.org)")]
  assert written == ["docs/bounds.md#units", "page.md#title"]
  assert FORBIDDEN.search(f"as in {_SPEC} §3.2")
  assert FORBIDDEN.search(f"test_{_SPEC.lower()}_8_2")
  assert not FORBIDDEN.search(f"_CONV_{_SPEC} = [...]")
