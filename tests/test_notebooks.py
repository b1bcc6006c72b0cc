"""The notebooks, executed by papermill in smoke mode on the planted synthetic world
(``hm4sr run-notebooks --smoke``), and their recorded values checked.

One smoke run (about 2.5 minutes on 2 cores) is shared by the module. The recorded
metrics must equal ``fixtures/notebooks_smoke_expected.json`` (same seed, CPU): after a
deliberate change to the model, the data or the training loop, regenerate it with
``HM4SR_UPDATE_EXPECTED=1 pytest tests/test_notebooks.py`` and say why in the commit.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from html import unescape as html_unescape
from pathlib import Path

import nbformat
import pytest
from click.testing import CliRunner
from papermill.cli import papermill as papermill_cli

from hm4sr_core.data.prepare import prepared_dataset
from hm4sr_core.data.schema import DataError
from hm4sr_core.data.store import read_manifest
from hm4sr_core.notebooks import (FULL_TRAINING, NOTEBOOK_DIR, NOTEBOOKS, TOUR, NotebookError, plan_parameters,
                                  run_notebooks)

EXPECTED = Path(__file__).parent / "fixtures" / "notebooks_smoke_expected.json"
# The same seed on one CPU reproduces these exactly; another CPU kind rounds float32 sums
# differently (seen: long_gap_shift, a total variation of near-uniform float32 gates, was
# 0.000971601090 on one machine and 0.000971599142 on another, 2e-9 apart). Values in [0, 1]
# computed in float32 are resolved to about 6e-8, and a real change moves them by seed noise,
# about 1e-2: 1e-6 relative or 1e-7 absolute still catches it.
TOLERANCE = 1e-6  # relative
ABS_TOLERANCE = 1e-7
METRIC_NAMES = ("ndcg@10", "hr@10", "mrr@10")
PARAMETER_LINE = re.compile(r"^(?P<name>\w+)\s*:\s*\w+\s*=\s*(?P<value>.*?)\s+#\s+(?P<help>.+)$")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    return run_notebooks(smoke=True, out=tmp_path_factory.mktemp("notebooks") / "run", progress=False,
                         cell_timeout=300)


@pytest.fixture(scope="module")
def records(smoke_run) -> dict[str, dict]:
    return {nb: json.loads((smoke_run / f"{nb}.json").read_text()) for nb in NOTEBOOKS}


def _finite_numbers(value, path="") -> list[tuple[str, float]]:
    """Every number in a record, with where it sits."""
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in _finite_numbers(v, f"{path}/{k}")]
    if isinstance(value, list):
        return [x for i, v in enumerate(value) for x in _finite_numbers(v, f"{path}[{i}]")]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(path, float(value))]
    return []


# ----------------------------------------------------------------------------- the notebooks as files


def _cells(nb_name: str):
    return nbformat.read(NOTEBOOK_DIR / f"{nb_name}.ipynb", as_version=4).cells


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_follows_the_house_layout(name):
    cells = _cells(name)
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# "), "first cell: an H1 title"
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    code = [c for c in cells if c.cell_type == "code"]
    assert code[0].source.lstrip().startswith(("import", "from")), "a setup cell with the imports comes first"
    assert all(not c.outputs and c.execution_count is None for c in code), "outputs must be cleared"
    for c in code:
        assert not re.search(r"^\s*(def|class|lambda)\b|\blambda\b", c.source, re.M), f"no functions:\n{c.source}"
    headings = [c.source for c in cells if c.cell_type == "markdown" and c.source.startswith("## ")]
    numbers = [int(re.match(r"## (\d+)\.", h).group(1)) for h in headings]
    assert numbers == list(range(1, len(numbers) + 1)), f"numbered sections 1..n, got {numbers}"
    for h in headings[:-1]:  # every section but the record opens with a why
        assert "*Why:*" in h, f"section without a why: {h[:60]}"
    assert f'save_record(output_dir / "{name}.json"' in code[-1].source, "the last cell records the results"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_help_notebook_lists_every_parameter_with_its_comment(name):
    source = next(c.source for c in _cells(name) if "parameters" in c.metadata.get("tags", []))
    declared = [PARAMETER_LINE.match(line) for line in source.splitlines() if line.strip()]
    assert all(declared), "every parameter line reads `name: type = value  # comment`"
    result = CliRunner().invoke(papermill_cli, ["--help-notebook", str(NOTEBOOK_DIR / f"{name}.ipynb")])
    assert result.exit_code == 0, result.output
    listed = dict(re.findall(r"^  (\w+): (\w+) \(default", result.output, re.M))
    assert set(listed) == {m["name"] for m in declared}, "papermill must infer every parameter"
    flat = " ".join(result.output.split())
    for m in declared:
        assert " ".join(m["help"].split()) in flat, f"{m['name']}: its comment is not in --help-notebook"
    assert {"smoke", "output_dir"} <= set(listed)


# ----------------------------------------------------------------------------- the run folder


def test_run_folder_has_every_artefact(smoke_run):
    manifest = json.loads((smoke_run / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["mode"] == "smoke"
    assert [n["name"] for n in manifest["notebooks"]] == list(NOTEBOOKS)
    data = manifest["data"]
    assert data["data_hash"] == read_manifest(data["dataset_dir"])["data_hash"]
    assert manifest["versions"]["papermill"] and manifest["versions"]["torch"]
    assert "commit" in manifest["git"] and manifest["kernel"]["name"] == "python3"
    index = (smoke_run / "index.html").read_text()
    for entry in manifest["notebooks"]:
        name = entry["name"]
        assert entry["status"] == "ok" and entry["parameters"]["smoke"] is True
        html = (smoke_run / f"{name}.html").read_text()
        assert "plotly-graph-div" in html, f"{name}.html has no rendered plotly figure"
        assert f'href="{name}.html"' in index and f'href="{name}.json"' in index
        assert list((smoke_run / "figures" / name).glob("*.json")), f"{name}: no key figure written"
        pngs = [p for p in entry["figures"] if p.endswith(".png")]
        if manifest["static_figures"]["status"] == "skipped":  # no Chromium here: said so, nothing exported
            assert "apt-get install" in manifest["static_figures"]["reason"] and not pngs
            assert manifest["static_figures"]["reason"] in html_unescape(index)
            continue
        assert manifest["static_figures"] == {"status": "ok", "reason": None, "formats": ["png", "svg"]}
        assert pngs, f"{name}: no key figure exported"
        for png in pngs:
            assert (smoke_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert "<svg" in (smoke_run / png).with_suffix(".svg").read_text()[:500]
            assert f'src="{png}"' in index


def test_executed_notebooks_got_the_parameters_and_no_errors(smoke_run):
    for name in NOTEBOOKS:
        nb = nbformat.read(smoke_run / f"{name}.ipynb", as_version=4)
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1 and "smoke = True" in injected[0].source
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"


# ----------------------------------------------------------------------------- recorded values


def test_every_recorded_number_is_finite(records):
    for name, record in records.items():
        for path, value in _finite_numbers(record):
            assert math.isfinite(value), f"{name}{path} = {value}"


def test_routing_tour_record(records, smoke_run):
    r = records[TOUR]
    assert r["parameters"]["smoke"] is True and r["stats"]["users"] == 60  # its own world, not the run's data
    assert r["planted"]["long_gap_days"] == 30.0 and 0.0 < r["long_gap_share"] < 1.0
    assert r["training"]["epochs_run"] == 2 and 1 <= r["training"]["best_epoch"] <= 2
    E = r["num_experts"]
    # Untrained gates sit near 1/E; each distance is a gate's distance from it, at most 1 - 1/E.
    assert r["distance_from_uniform"]["untrained interactive"] < 0.05
    assert all(0.0 <= d <= 1 - 1 / E for d in r["distance_from_uniform"].values())
    # The Interactive MoE comes before the time embedding: shuffled time cannot move it.
    assert r["interactive_change_when_time_shuffled"] == 0.0
    plants = {row["plant"] for row in r["measures"]}
    assert plants == {"category -> text gates", "category -> image gates", "break -> temporal gate",
                      "return month -> temporal gate", "jump after a return -> temporal gate"}
    assert all(0.0 <= row["value"] <= 1.0 and row["positions"] > 0 for row in r["measures"])
    for row in r["recovery"]:  # the verdict follows from the measures by the stated rule
        controls = [m["value"] for m in r["measures"] if m["plant"] == row["plant"] and m["condition"] != "trained"]
        assert row["control_value"] == max(controls)
        assert row["recovered"] == (row["trained"] >= 2 * row["control_value"] and row["trained"] >= 0.05)
        assert row["verdict"].startswith("recovered" if row["recovered"] else "NOT recovered")
    manifest = json.loads((smoke_run / "manifest.json").read_text())
    assert manifest["notebooks"][0]["name"] == TOUR and "dataset" not in manifest["notebooks"][0]["parameters"]


def test_prepared_data_record(records):
    r = records["01_prepare_data"]
    assert r["source"] == "synthetic" and r["stats"]["users"] == 120 and r["stats"]["items"] >= 50
    assert r["zero_gap_share"] == 0.0  # the planted world's timestamps strictly increase per user
    assert 0.0 <= r["users_longer_than_t"] <= 1.0
    assert sum(c["items"] for c in r["categories"]) == r["stats"]["items"]  # one category per item
    assert r["planted"]["long_gap_days"] == 30.0 and len(r["planted"]["month_category"]) == 12


def test_training_record(records, smoke_run):
    r = records["02_train"]
    for model in ("hm4sr", "sasrec"):
        m = r["test"][model]
        for k, v in m.items():
            if k != "popularity@10":
                assert 0.0 <= v <= 1.0, f"{model} {k} = {v}"
        assert m["ndcg@10"] <= m["hr@10"] and m["mrr@10"] <= m["ndcg@10"] and m["hr@10"] <= m["hr@20"]
        assert Path(r["checkpoints"][model]).exists()
        assert r["epochs_run"][model] == 2


def test_gates_sum_to_one_and_controls_behave(records):
    r = records["03_expert_gating"]
    assert r["interactive_gate_sum_error"] < 1e-5 and r["temporal_gate_sum_error"] < 1e-5
    for table in ("interactive_usage", "interactive_usage_dropped"):
        per_stream: dict[str, float] = {}
        for row in r[table]:
            assert 0.0 <= row["gate"] <= 1.0
            per_stream[row["stream"]] = per_stream.get(row["stream"], 0.0) + row["gate"]
        assert set(per_stream) == set(r["streams"])
        assert all(abs(s - 1.0) < 1e-6 for s in per_stream.values()), per_stream
    assert abs(sum(row["gate"] for row in r["temporal_usage"]) - 1.0) < 1e-6
    # The Interactive MoE comes before the time embedding: shuffled time cannot move it.
    assert r["interactive_change_when_time_shuffled"] == 0.0
    # Dropping the image changes the image stream's gates, not the ID stream's.
    ids = [(a["gate"], b["gate"]) for a, b in zip(r["interactive_usage"], r["interactive_usage_dropped"])
           if a["stream"] == "id"]
    assert all(a == b for a, b in ids)
    shift = r["long_gap_shift"]
    assert 0.0 <= shift["real"] <= 1.0 and 0.0 <= shift["shuffled"] <= 1.0 and shift["n_long"] > 0
    assert set(r["final_lambda"]) == set(r["streams"])
    assert 0.0 <= r["final_entropy"]["interactive"] <= math.log(r["num_experts"]) + 1e-6


def test_temporal_embedding_record(records):
    r = records["04_temporal_embeddings"]
    assert r["one_day_bucket"] == 1641  # floor(100 log2(86401)) + 2
    assert 2 <= r["smallest_gap_bucket"] <= r["largest_gap_bucket"] < 3203
    assert r["zero_gap_position_share"] == 0.0
    controls = {row["eval_time"]: row for row in r["time_controls_sasrec"]}
    assert set(controls) == {"real", "shuffled", "zeroed"}
    # SASRec sees no time: its metrics cannot depend on the timestamps.
    for k in METRIC_NAMES:
        assert controls["real"][k] == controls["shuffled"][k] == controls["zeroed"][k]
    for row in r["time_controls"]:
        assert all(0.0 <= row[k] <= 1.0 for k in METRIC_NAMES)
    assert [row["model"] for row in r["frozen_vs_trained"]] == ["hm4sr", "frozen-temporal-experts"]
    assert all(row["trained"] > 0 and row["frozen"] > 0 for row in r["expert_norms"])


def test_loss_contribution_record(records):
    r = records["05_loss_contributions"]
    shares = [row["share"] for row in r["last_step_shares"]]
    assert [row["task"] for row in r["last_step_shares"]] == ["rec", "id_contrastive", "category",
                                                               "placeholder_contrastive"]
    assert abs(sum(shares) - 1.0) < 1e-9 and all(0.0 <= s <= 1.0 for s in shares)
    grads = {row["task"]: row for row in r["gradient_shares"]}
    assert abs(sum(row["share"] for row in grads.values()) - 1.0) < 1e-9
    assert abs(grads["rec"]["cosine_to_rec"] - 1.0) < 1e-9 and r["shared_parameters"] > 0
    ablation = r["ablation"]
    assert [row["model"] for row in ablation] == ["hm4sr", "no-id-contrastive", "no-category",
                                                  "no-placeholder-contrastive"]
    assert all(row["seeds"] == 2 for row in ablation)
    assert ablation[0]["ndcg@10 p"] is None  # the baseline row has no test against itself
    assert all(0.0 <= row["ndcg@10 p"] <= 1.0 for row in ablation[1:])


def test_atlas_record_recovers_the_planted_categories(records):
    r = records["06_embedding_atlas"]
    assert r["coordinates_finite"] is True and r["spaces"] == ["id", "text", "image", "fused"]
    agreement = {row["space"]: row for row in r["agreement"]}
    assert all(0.0 <= row["agreement"] <= 1.0 for row in agreement.values())
    # Text vectors were built from a category prototype: neighbours share the category far above chance.
    assert agreement["text"]["agreement"] > 3 * agreement["text"]["chance"]
    assert sum(r["dominant_experts"].values()) == r["items"]


def test_tuning_record(records):
    r = records["08_tuning"]
    states, params = r["states"], r["parameters"]
    assert states["complete"] + states["pruned"] == params["trials"] and states["fail"] == states["running"] == 0
    trials = r["trials"]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    assert r["best"]["value"] == max(t["valid_ndcg@20"] for t in complete)
    # a pruned trial stopped before the epoch cap, after the warm-up; a completed one ran to the cap
    assert all(params["warmup_epochs"] <= t["epochs"] < params["epochs"] for t in trials if t["state"] == "PRUNED")
    assert all(t["epochs"] == params["epochs"] for t in complete)
    assert [s["seed"] for s in r["final"]] == params["final_seeds"]
    # the final run with the seed the trials used repeats the best trial's validation value
    assert r["final"][0]["valid"]["ndcg@20"] == pytest.approx(r["best"]["value"], rel=1e-12)
    rows = {row["model"]: row for row in r["comparison"]}
    assert set(rows) == {"hm4sr_default", "hm4sr_tuned"} and 0.0 <= rows["hm4sr_tuned"]["ndcg@20 p"] <= 1.0
    assert set(r["importances"]) == set(r["best"]["params"])


def test_recommendation_record(records):
    r = records["07_recommend_and_explain"]
    assert r["parameters"]["smoke"] is True and r["planted_data_used"] is True  # the smoke run's data is planted
    k = r["parameters"]["k"]
    assert len(r["lists"]) == 3 and all(len(items) == len(set(items)) == k for items in r["lists"].values())
    assert r["streams"] == ["id", "text", "image"]
    # The parts sum to the score: their means sum to the mean score (up to its float32 rounding).
    assert abs(sum(row["share_of_mean_score"] for row in r["stream_summary"]) - 1.0) < 1e-5
    assert abs(r["largest_parts_sum"] - 1.0) < 1e-12
    assert r["occlusion_rows"] > 0 and 0.0 <= r["what_if"]["temporal_shift"] <= 1.0
    assert 0 <= r["what_if"]["entered"] <= k
    rule = {row["condition"]: row for row in r["month_rule"]}
    assert set(rule) == {"real", "shuffled", "short gap"} and len({row["users"] for row in rule.values()}) == 1
    assert all(0.0 <= row["rule_share"] <= 1.0 and 0.0 < row["chance"] < 1.0 for row in rule.values())
    assert r["follows_month_rule"] == (rule["real"]["rule_share"] > max(rule["shuffled"]["rule_share"],
                                                                       rule["short gap"]["rule_share"]))


def _comparable(records: dict) -> dict:
    """The values that must repeat exactly for the seed: metrics, not timings or paths."""
    train = records["02_train"]
    return {
        "stats": records["01_prepare_data"]["stats"],
        "test": {m: {k: train["test"][m][k] for k in METRIC_NAMES} for m in ("hm4sr", "sasrec")},
        "long_gap_shift": records["03_expert_gating"]["long_gap_shift"]["real"],
        "time_controls": {row["eval_time"]: row["ndcg@10"] for row in records["04_temporal_embeddings"]["time_controls"]},
        "ablation": {row["model"]: row["ndcg@10 mean"] for row in records["05_loss_contributions"]["ablation"]},
        "agreement": {row["space"]: row["agreement"] for row in records["06_embedding_atlas"]["agreement"]},
        "recommend": {"stream_mean_part": {row["stream"]: row["mean_part"]
                                           for row in records["07_recommend_and_explain"]["stream_summary"]},
                      "month_rule": {row["condition"]: row["rule_share"]
                                     for row in records["07_recommend_and_explain"]["month_rule"]}},
        "tuning": {"best_value": records["08_tuning"]["best"]["value"], "states": records["08_tuning"]["states"],
                   "test_ndcg@20": {row["model"]: row["ndcg@20 mean"] for row in records["08_tuning"]["comparison"]}},
        "tour": {"test_ndcg@10": records[TOUR]["training"]["test"]["ndcg@10"],
                 "measures": {f"{row['plant']} / {row['condition']}": row["value"] for row in records[TOUR]["measures"]}},
    }


def test_smoke_metrics_equal_the_stored_expectation(records):
    got = _comparable(records)
    if os.environ.get("HM4SR_UPDATE_EXPECTED") == "1":
        EXPECTED.parent.mkdir(parents=True, exist_ok=True)
        EXPECTED.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    expected = dict(_finite_numbers(json.loads(EXPECTED.read_text())))
    got = dict(_finite_numbers(got))
    assert sorted(got) == sorted(expected), "recorded values changed shape; regenerate with HM4SR_UPDATE_EXPECTED=1"
    mismatches = [(path, got[path], expected[path]) for path in sorted(got)
                  if not math.isclose(got[path], expected[path], rel_tol=TOLERANCE, abs_tol=ABS_TOLERANCE)]
    assert not mismatches, (f"smoke metrics differ from {EXPECTED.name} (path, got, expected): {mismatches[:5]}; "
                            f"after a deliberate change regenerate with HM4SR_UPDATE_EXPECTED=1")


# ----------------------------------------------------------------------------- failure


def test_a_failing_notebook_stops_the_run_naming_notebook_and_cell(tmp_path):
    out = tmp_path / "failed"
    with pytest.raises(NotebookError) as info:
        # from 01 on: the routing tour before it needs no data (and would train for half a minute)
        run_notebooks(data="no-such-dataset", out=out, notebooks=NOTEBOOKS[1:], progress=False, cell_timeout=120)
    err = info.value
    assert err.notebook == "01_prepare_data" and err.ename == "DataError"
    message = str(err)
    assert "01_prepare_data.ipynb" in message and f"cell [{err.cell}]" in message and "no-such-dataset" in message
    assert "prepared_dataset(" in message  # the failing cell's source is shown
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and [n["name"] for n in manifest["notebooks"]] == ["01_prepare_data"]
    assert manifest["notebooks"][0]["error"]["ename"] == "DataError"
    assert (out / "01_prepare_data.html").exists() and not (out / "02_train.ipynb").exists()
    assert "failed" in (out / "index.html").read_text()


def test_a_kernel_that_dies_stops_the_run_naming_its_log(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("smoke = False", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import os\nos.write(2, b'last words\\n')  # the process's own stderr, as a crash "
                                          "writes it\nos._exit(3)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, notebooks / "01_prepare_data.ipynb")
    out = tmp_path / "run"
    t0 = time.monotonic()
    with pytest.raises(NotebookError, match="its kernel failed") as info:
        run_notebooks(out=out, notebooks=("01_prepare_data",), notebook_dir=notebooks, progress=False,
                      cell_timeout=60)
    assert time.monotonic() - t0 < 120
    log = out / "01_prepare_data.kernel.log"
    assert str(log) in str(info.value) and "last words" in log.read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["notebooks"][0]["kernel_log"] == log.name


def test_kernel_output_goes_to_the_run_folder_not_the_terminal(smoke_run):
    manifest = json.loads((smoke_run / "manifest.json").read_text())
    for entry in manifest["notebooks"]:
        log = smoke_run / entry["kernel_log"]
        # ipykernel 7 warns about its TCP transport at every start: it landed in the log
        assert "Kernel is running over TCP" in log.read_text(), f"{log} did not get the kernel's stderr"


# ----------------------------------------------------------------------------- runner pieces (no kernel)


def test_plan_parameters_per_mode(tmp_path):
    smoke = plan_parameters("smoke", None, tmp_path)
    first = smoke["01_prepare_data"]
    assert first["source"] == "synthetic" and first["reuse"] is False
    assert first["data_root"] == str(tmp_path / "data")  # a smoke run prepares its own world
    assert smoke["03_expert_gating"]["dataset"] == str(tmp_path / "data" / first["dataset_name"])
    assert all(p["smoke"] and p["figure_formats"] == ["json"] and p["output_dir"] == str(tmp_path)
               for p in smoke.values())
    demo = plan_parameters("demo", None, tmp_path)
    assert demo["01_prepare_data"]["source"] == "ml-100k" and demo["02_train"]["dataset"] == "ml-100k"
    assert "epochs" not in demo["02_train"]  # the notebooks' own demo sizes
    full = plan_parameters("full", "games", tmp_path, seed=7)
    assert full["01_prepare_data"]["source"] == ""  # not a reader: must be prepared already
    assert all(p["seed"] == 7 and p["epochs"] == FULL_TRAINING["epochs"] for p in full.values())
    # The routing tour comes first and always trains on its own planted world: no dataset, in every mode.
    assert NOTEBOOKS[0] == TOUR == "00_expert_routing_tour"
    for plan in (smoke, demo, full, plan_parameters("demo", "ml-100k", tmp_path)):
        assert list(plan)[0] == TOUR and "dataset" not in plan[TOUR] and "source" not in plan[TOUR]
    assert full[TOUR]["epochs"] == FULL_TRAINING["epochs"] and full[TOUR]["seed"] == 7
    with pytest.raises(ValueError, match="mode must be"):
        plan_parameters("fast", None, tmp_path)
    with pytest.raises(ValueError, match="--smoke or --full"):
        run_notebooks(smoke=True, full=True, out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_prepared_dataset_prepares_once_then_reuses(tmp_path):
    world = {"n_users": 20, "n_items": 12}
    _, folder = prepared_dataset("synthetic", "tiny", out_root=tmp_path, seed=1, synthetic=world)
    manifest = (folder / "manifest.json").stat().st_mtime_ns
    again, same = prepared_dataset("synthetic", "tiny", out_root=tmp_path, seed=2, synthetic=world)
    assert same == folder and (folder / "manifest.json").stat().st_mtime_ns == manifest  # loaded, not rebuilt
    assert again.source["seed"] == 1
    with pytest.raises(DataError, match=r"seed \(1 there, 2 now\).*overwrite"):  # other inputs: never silently
        prepared_dataset("synthetic", "tiny", out_root=tmp_path, reuse=False, seed=2, synthetic=world)
    assert (folder / "manifest.json").stat().st_mtime_ns == manifest
    _, rebuilt = prepared_dataset("synthetic", "tiny", out_root=tmp_path, reuse=False, overwrite=True, seed=2,
                                  synthetic=world)
    assert read_manifest(rebuilt)["source"]["seed"] == 2
    with pytest.raises(DataError, match="no prepared dataset named 'absent'"):
        prepared_dataset(None, "absent", out_root=tmp_path)


def test_save_figure_writes_plotly_json_without_a_browser(tmp_path, monkeypatch):
    import plotly.graph_objects as go
    import plotly.io as pio
    from hm4sr_core import static_export

    def no_browser():
        raise AssertionError("plotly JSON needs no browser")

    monkeypatch.setattr(static_export, "find_browser", no_browser)
    fig = go.Figure(go.Bar(x=["a", "b"], y=[1, 2]), layout={"title": {"text": "t"}})
    (path,) = static_export.save_figure(fig, tmp_path / "figures" / "bars", formats=["json"])
    assert path.name == "bars.json" and pio.read_json(path) == fig


# The runner on a bare machine: no browser on PATH, none at /usr/bin/chromium. In a child
# process with a timeout, so that a hang (as kaleido waiting for a browser did) fails the test.
BARE_RUN = """
import sys
from hm4sr_core import static_export
static_export.DEBIAN_CHROMIUM = sys.argv[1] + "/no-chromium"
from hm4sr_core.notebooks import run_notebooks
run_notebooks(smoke=True, notebooks=("01_prepare_data",), out=sys.argv[1] + "/run", progress=False, cell_timeout=120)
"""


def test_runner_without_a_browser_finishes_and_says_what_it_left_out(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "BROWSER_PATH"}
    env["PATH"] = str(tmp_path / "bin")
    (tmp_path / "bin").mkdir()
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", BARE_RUN, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "PNG/SVG figures not exported" in line]
    assert len(lines) == 1, done.stderr[-3000:]
    assert "apt-get install -y chromium fonts-dejavu-core" in lines[0] and "plotly JSON figures are written" in lines[0]
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["static_figures"]["status"] == "skipped"
    assert list((run / "figures" / "01_prepare_data").glob("*.json"))
    assert not list(run.rglob("*.png")) and not list(run.rglob("*.svg"))
    assert (run / "01_prepare_data.html").exists()
    assert time.monotonic() - t0 < 240
