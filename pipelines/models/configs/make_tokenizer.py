"""Write the CLIP tokenizer files (``vocab.json``, ``merges.txt``) shipped in ``clip_tokenizer/``.

How the committed files were produced (docs/compatibility.md §11)::

    pip download --no-deps open-clip-torch -d /tmp/oc        # not installed, only unpacked
    python pipelines/models/configs/make_tokenizer.py /tmp/oc/open_clip_torch-*.whl

The source is ``open_clip/bpe_simple_vocab_16e6.txt.gz`` inside the open-clip-torch wheel
(MIT licence, see ``clip_tokenizer/LICENSE``): the byte-level BPE of OpenAI's CLIP, used by
SD 1.x, SD 2.x and both SDXL text encoders. The Hugging Face files follow from it
deterministically:

- merges: lines 1 to 48894 of the file (line 0 is a header);
- vocab: GPT-2's 256 byte-level symbols, the same 256 with ``</w>`` appended, one entry per
  merge (its two parts joined), then ``<|startoftext|>`` and ``<|endoftext|>`` (49408 entries).

Run with no argument it only checks that the committed files encode a known prompt right.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import zipfile
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "clip_tokenizer"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
MERGE_COUNT = 49152 - 256 - 2
EXPECTED_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def read_bpe_lines(wheel: Path) -> list[str]:
    """The lines of the gzipped BPE file inside the open-clip-torch wheel."""
    with zipfile.ZipFile(wheel) as archive:
        data = gzip.decompress(archive.read(BPE_MEMBER))
    return data.decode("utf-8").split("\n")


def build(lines: list[str]) -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merge list of CLIP ViT-L/14 from the open_clip BPE lines."""
    merges = lines[1 : 1 + MERGE_COUNT]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def write(out_dir: Path, vocab: dict[str, int], merges: list[str]) -> None:
    """Write ``vocab.json`` and ``merges.txt`` in the layout transformers reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def check(out_dir: Path) -> list[int]:
    """Encode the reference prompt with transformers' CLIPTokenizer loaded from ``out_dir``."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(out_dir, model_max_length=77, local_files_only=True)
    return tokenizer("a photo of a cat").input_ids


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: build from a wheel (optional) and verify."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, nargs="?", help="open_clip_torch-*.whl; omit to only verify")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.wheel is not None:
        vocab, merges = build(read_bpe_lines(args.wheel))
        if len(vocab) != 49408 or len(merges) != MERGE_COUNT:
            print(f"unexpected sizes: vocab {len(vocab)}, merges {len(merges)}", file=sys.stderr)
            return 1
        write(args.out, vocab, merges)
    ids = check(args.out)
    print(f"'a photo of a cat' -> {ids}")
    return 0 if ids == EXPECTED_IDS else 1


if __name__ == "__main__":
    sys.exit(main())
