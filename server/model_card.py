"""The model card of a release, in Hugging Face's format (``huggingface_hub.ModelCard``).

A README.md with a YAML header (``base_model``, ``library_name: peft``, tags and a
``model-index`` holding each site's held-out accuracy) and a body that states what the
numbers mean: per-site accuracy with its 95 % Wilson interval from the site's eval count,
and each site's record-level ε at δ (Mitchell et al. 2019, "Model Cards for Model
Reporting").
"""

from __future__ import annotations

from typing import Any, Mapping

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from fedadapt.server.provenance import wilson_interval

TAGS = ("fedadapt", "federated-learning", "differential-privacy", "lora", "peft",
        "medical-imaging", "monai")


def site_metrics(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per site: final accuracy, eval count and its 95 % Wilson interval (None if the
    site was never evaluated).

    The interval treats the site's held-out records as independent draws; it covers
    sampling error of the evaluation only, not shift to other sites.
    """
    out: dict[str, dict[str, Any]] = {}
    for site, info in sorted(summary.get("sites", {}).items()):
        acc, n = info.get("final_accuracy"), int(info.get("num_test", 0) or 0)
        if acc is None or n < 1:
            out[site] = {"accuracy": None, "num_eval": n, "ci95": None}
            continue
        k = round(float(acc) * n)
        lo, hi = wilson_interval(k, n)
        out[site] = {"accuracy": float(acc), "num_eval": n, "ci95": [lo, hi]}
    return out


def _yaml_data(manifest: Mapping[str, Any], metrics: Mapping[str, Mapping[str, Any]],
               name: str) -> ModelCardData:
    results = [EvalResult(task_type="image-classification", dataset_type=f"fedadapt-site/{site}",
                          dataset_name=f"{site} (held-out)", dataset_split="test",
                          metric_type="accuracy", metric_value=round(m["accuracy"], 6),
                          metric_name=(f"accuracy (95% Wilson CI {m['ci95'][0]:.3f}-"
                                       f"{m['ci95'][1]:.3f}, n={m['num_eval']})"),
                          metric_args={"ci95_low": round(m["ci95"][0], 6),
                                       "ci95_high": round(m["ci95"][1], 6),
                                       "num_eval": m["num_eval"]})
               for site, m in metrics.items() if m["accuracy"] is not None]
    base = manifest["base_model"]
    return ModelCardData(base_model=f"fedadapt/{base['name']}", library_name="peft",
                         tags=list(TAGS), model_name=name,
                         eval_results=results or None,
                         base_model_sha256=base["state_dict_sha256"])


def render_card(manifest: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    """The model card text (README.md) for a release manifest and its run's summary."""
    metrics = site_metrics(summary)
    name = f"fedadapt-{manifest['run']['id']}"
    data = _yaml_data(manifest, metrics, name)
    base, cfg = manifest["base_model"], manifest["run"]["config"]
    rows = []
    for site, m in metrics.items():
        eps = manifest["sites"].get(site, {})
        acc = ("-" if m["accuracy"] is None else
               f"{m['accuracy']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]")
        rows.append(f"| {site} | {acc} | {m['num_eval']} | {eps.get('num_train', '-')} | "
                    f"{_eps_text(eps)} |")
    body = "\n".join([
        f"# {name}", "",
        "A LoRA adapter (PEFT) and task head trained by a fedadapt federation of "
        f"{len(metrics)} sites with strategy `{manifest['run']['strategy']}` over "
        f"{cfg.get('num-server-rounds')} rounds; the backbone stayed frozen and never left "
        "the sites' copies of the public spec.", "",
        "## Base model", "",
        f"- architecture: `{base['name']}`, built from the model spec in `provenance.json`",
        f"- weights: `{base['weights']}` (file sha256 `{base.get('weights_file_sha256')}`)",
        f"- state-dict sha256 of the frozen base: `{base['state_dict_sha256']}`", "",
        "## Evaluation (held-out split of each site)", "",
        "Accuracy with its 95 % Wilson score interval from the site's eval count; the "
        "interval covers evaluation sampling only. ε is record-level DP at each site "
        "(a record is one image), recomputed from the site's ledger at release.", "",
        "| site | accuracy [95% CI] | n eval | n train | record-level ε (δ, accountant) |",
        "| --- | --- | --- | --- | --- |", *rows, "",
        "## Use", "",
        "```python",
        "import json",
        "from peft import PeftModel",
        "from fedadapt.imaging.backbones import ModelSpec",
        "from fedadapt.server.release import released_base",
        "spec = ModelSpec(**json.load(open('provenance.json'))['base_model']['spec'])",
        "model = PeftModel.from_pretrained(released_base(spec), 'adapter').eval()",
        "```", "",
        "## Provenance", "",
        "`provenance.json` lists every file's sha256, the run config, code and library "
        "versions, and each site's ledger head; `provenance.sig` is its Ed25519 "
        "signature. Check with `fedadapt release verify DIR --public-key KEY.pub "
        "[--ledgers SITES_DIR]`.", "",
        "## Limitations", "",
        "Validation metrics and example counts leave the sites without DP (a documented "
        "leak). Accuracy at a site with a scanner no training site had is not covered by "
        "these numbers; see `fedadapt tta`.", ""])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _eps_text(site: Mapping[str, Any]) -> str:
    heads = site.get("ledgers") or []
    if not heads:
        return "no DP rounds recorded"
    return "; ".join(f"{h['epsilon']:.3f} (δ={h['delta']:g}, {h['accountant']})" for h in heads)
