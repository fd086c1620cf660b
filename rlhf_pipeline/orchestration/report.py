"""The pipeline's last step: point the `challenger` alias at the evaluated policy version and write the run report
(Markdown and HTML) with the headline metrics, the registered versions and sample generations."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from rlhf_pipeline import tracking
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.evaluation.markdown_safe import inline
from rlhf_pipeline.orchestration.headline import gate_line, headline_rows
from rlhf_pipeline.orchestration.mlflow_filter import equals

CHALLENGER = "challenger"
FENCE = "`" * 3
HEADLINE = ("rm/accuracy", "eval/reward_mean", "eval/kl", "eval/win_rate", "eval/judge_win_rate")
POLICIES = ("policy", "second_policy")  # the report's model keys that are policies (`alignment: both`: two)


def find_version(client, name: str, *, version: str | None = None, kfp_run_id: str | None = None):
    """The registered version: the one named, else the newest of `name` tagged with this Kubeflow run."""
    from mlflow.exceptions import MlflowException

    try:
        if version:
            return client.get_model_version(name, str(version))
        if kfp_run_id:
            found = client.search_model_versions(equals({"name": name, "tags.kfp_run_id": kfp_run_id}))
            if found:
                return max(found, key=lambda v: int(v.version))
    except MlflowException as exc:
        raise UserError(f"cannot read registered model {name}: {exc.message.splitlines()[0]}") from None
    return None


def point_challenger(client, name: str, version: str, alias: str = CHALLENGER) -> None:
    client.set_registered_model_alias(name, alias, str(version))


def _short(value: str) -> str:
    """Hashes to 12 characters; paths to their last two components."""
    if "/" in value:
        return "…/" + "/".join(value.rstrip("/").split("/")[-2:])
    if len(value) > 12 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def read_generations(path: Path, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` questions with every model's answer: the evaluation writes one row per (question, model)
    with `question, model, response, reward, kl`; rows are grouped back by question, in file order."""
    grouped: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            continue
        q = str(row.get("question") or row.get("prompt") or "")
        if q not in grouped:
            if len(grouped) >= limit:
                continue
            grouped[q] = {"question": q, "answers": []}
        if "model" in row:
            grouped[q]["answers"].append(
                {
                    "model": str(row["model"]),
                    "response": str(row.get("response", "")),
                    "reward": row.get("reward"),
                    "kl": row.get("kl"),
                }
            )
        else:  # one row per question with a column per model
            for key, value in row.items():
                if key not in ("question", "prompt") and isinstance(value, str):
                    grouped[q]["answers"].append({"model": key, "response": value, "reward": None, "kl": None})
    return list(grouped.values())


def render_markdown(
    *,
    title: str,
    alignment: str,
    metrics: dict[str, float],
    versions: list[dict[str, Any]],
    generations: list[dict[str, Any]],
    extra: str = "",
    gates: dict[str, Any] | None = None,
    challenger: str | None = None,
) -> str:
    lines = [
        f"# {title}",
        "",
        f"Alignment: **{alignment}**",
        "",
        *did_it_help(metrics, gates, challenger),
        "## Headline metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key in HEADLINE:
        lines.append(f"| {key} | {_fmt(metrics[key]) if key in metrics else 'n/a'} |")
    others = sorted(k for k in metrics if k not in HEADLINE)
    if others:
        lines += ["", "## All step metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(metrics[k])} |" for k in others]
    if versions:
        lines += [
            "",
            "## Registered model versions",
            "",
            "| model | version | aliases | lineage |",
            "|---|---|---|---|",
        ]
        for v in versions:
            lineage = ", ".join(
                f"{k}={_short(str(v['tags'][k]))}"
                for k in ("data_hash", "base_model", "git_commit", "config_hash", "kfp_run_id")
                if k in v.get("tags", {})
            )
            lines.append(f"| {v['name']} | {v['version']} | {', '.join(v.get('aliases', []))} | {lineage} |")
    if generations:
        lines += ["", "## Sample generations", ""]
        for i, g in enumerate(generations, 1):
            q = g["question"].strip()
            lines += [f"### Question {i}", "", "> " + inline(q[:600]).replace("\n", "\n> "), ""]
            for a in g["answers"]:
                score = ", ".join(f"{k} {_fmt(a[k])}" for k in ("reward", "kl") if isinstance(a.get(k), (int, float)))
                text = a["response"].strip()[:800].replace(FENCE, "'" * 3)
                head = f"**{inline(a['model'])}**" + (f" ({score})" if score else "")
                lines += [head, "", FENCE + "text", text, FENCE, ""]
    if extra.strip():
        lines += ["", "## Evaluation report", "", extra.strip()]
    return "\n".join(lines) + "\n"


def did_it_help(metrics: dict[str, float], gates: dict[str, Any] | None, challenger: str | None) -> list[str]:
    """The report's opening section: each policy next to SFT (n, judge win-rate [95% CI], wins/ties/losses) and
    the promotion gates' verdict on the challenger version."""
    rows = headline_rows(metrics)
    if not rows and gates is None:
        return []
    lines = ["## Did it help?", ""]
    if rows:
        lines += [
            "| policy | n | win-rate vs SFT [95% CI] | wins / ties / losses | proxy win-rate | KL to SFT |",
            "|---|---|---|---|---|---|",
        ]
    for r in rows:
        ci = f" [{r['low']:.3f}, {r['high']:.3f}]" if r["low"] is not None else ""
        wtl = f"{r['wins']:.0f} / {r['ties']:.0f} / {r['losses']:.0f}" if r["wins"] is not None else "-"
        name = inline(r["model"]) + (" (challenger)" if r["model"] == challenger else "")
        lines.append(
            f"| {name} | {r['n']} | {r['win_rate']:.3f}{ci} ({'judge' if r['judged'] else 'proxy'}) | {wtl} "
            f"| {_fmt(r['proxy_win_rate'])} | {_fmt(r['kl'])} |"
        )
    return [*lines, *([""] if rows else []), gate_line(gates), ""]


def markdown_to_html(md: str, title: str) -> str:
    """A small, dependency-free rendering of the report's Markdown subset (headings, tables, code, quotes)."""
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px}pre{background:#f4f4f4;padding:8px;white-space:pre-wrap}"
        "blockquote{color:#555;border-left:3px solid #ccc;margin-left:0;padding-left:8px}</style></head><body>",
    ]
    in_code, in_table = False, False
    for line in md.splitlines():
        if line.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
                out.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith(">"):
            out.append(f"<blockquote>{html.escape(line[1:].strip())}</blockquote>")
        elif line.strip():
            text = html.escape(line)
            while "**" in text and text.count("**") >= 2:
                text = text.replace("**", "<b>", 1).replace("**", "</b>", 1)
            out.append(f"<p>{text}</p>")
    if in_table:
        out.append("</table>")
    if in_code:
        out.append("</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def version_info(client, mv) -> dict[str, Any]:
    aliases = list(getattr(mv, "aliases", None) or [])
    return {
        "name": mv.name,
        "version": str(mv.version),
        "tags": dict(mv.tags or {}),
        "aliases": aliases,
        "run_id": mv.run_id,
    }


def run_report_step(
    *,
    models: dict[str, Any],
    eval_metrics: Any,
    generations: Any,
    eval_report: Any,
    alignment: str,
    summary: Any,
    report_md: Any,
    report_html: Any,
    tracking_uri: str,
    registered_model_prefix: str,
    kfp_run_id: str,
    num_samples: int,
    alias: str,
    check_gates: Any = None,
) -> dict[str, Any]:
    """The report component's body (see components/report.py). `check_gates(client, name, version)`: the promotion
    gates' verdict on the challenger version (ops/gates.dry_run, passed in by the component: ops sits above
    this layer), shown at the top of the report."""
    metrics: dict[str, float] = {}
    for art in models.values():
        step_file = Path(art.path) / "step.json"
        if step_file.is_file():
            metrics.update(json.loads(step_file.read_text()).get("metrics", {}))
    metrics.update(
        {
            k: float(v)
            for k, v in (eval_metrics.metadata or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    )

    client = tracking.client(tracking_uri or None)
    run_id = kfp_run_id if kfp_run_id and not kfp_run_id.startswith("{{") else None
    # the evaluation names the challenger (models:/name/version) when it compared several policies
    named = str((getattr(eval_report, "metadata", None) or {}).get("challenger_uri") or "")
    found = []
    policy_version = None
    for key, art in models.items():
        meta = art.metadata or {}
        name = meta.get("registered_model") or f"{registered_model_prefix}-{'policy' if key in POLICIES else key}"
        mv = find_version(client, name, version=meta.get("registered_version"), kfp_run_id=run_id)
        if mv is None:
            continue
        found.append(mv)
        if key in POLICIES and (
            named == f"models:/{mv.name}/{mv.version}" or (not named and key == "policy" and policy_version is None)
        ):
            policy_version = mv
    if policy_version is not None:
        point_challenger(client, policy_version.name, policy_version.version, alias)
    versions = [version_info(client, client.get_model_version(mv.name, mv.version)) for mv in found]
    if policy_version is None:
        raise UserError(
            f"no registered policy version found for this run (model {registered_model_prefix}-policy, "
            f"kfp_run_id={run_id}); was the policy step run with --no-register-model?"
        )

    for key in HEADLINE:
        if key in metrics:
            summary.log_metric(key, metrics[key])
    gen_rows = read_generations(Path(generations.path) / "generations.jsonl", num_samples)
    extra = Path(eval_report.path).read_text(encoding="utf-8") if Path(eval_report.path).is_file() else ""
    title = f"RLHF pipeline report ({alignment})"
    gates = check_gates(client, policy_version.name, policy_version.version) if check_gates else None
    challenger = (getattr(eval_report, "metadata", None) or {}).get("challenger")
    md = render_markdown(
        title=title,
        alignment=alignment,
        metrics=metrics,
        versions=versions,
        generations=gen_rows,
        extra=extra,
        gates=gates,
        challenger=challenger,
    )
    Path(report_md.path).write_text(md, encoding="utf-8")
    Path(report_html.path).write_text(markdown_to_html(md, title), encoding="utf-8")
    report_md.metadata["challenger"] = f"{policy_version.name}/{policy_version.version}"
    # Kubeflow: the report on the pipeline's MLflow run too, with the frontier report.md embeds (evaluate passes it
    # next to generations.jsonl); `rlhf run` logs its own at the end
    tracking.log_pipeline_report(
        client,
        {
            "report.md": Path(report_md.path),
            "report.html": Path(report_html.path),
            "frontier.png": Path(generations.path) / "frontier.png",
        },
    )
    return {"metrics": metrics, "versions": versions, "challenger": report_md.metadata["challenger"], "gates": gates}
