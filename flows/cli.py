"""The ``radflow`` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from flows.console import err, fail
from flows.screen_cli import screen
from tasks.core.config import PreprocessConfig, Provider, WindowName
from tasks.core.errors import ConfigError, RadflowError

# Without PREFECT_API_URL a run starts a temporary Prefect API: give it 2 minutes, not
# Prefect's 20 s (a first run migrates a new database; CI saw 20 s pass on a busy machine).
# Set before Prefect is imported (no command imports it at module level); a user's value stays.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

app = typer.Typer(
    help="Screen DICOM studies with a panel of vision LLMs, orchestrated by Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command()(screen)  # `radflow screen` (flows/screen_cli.py): the first command


@app.command()
def lookup(
    dest: Annotated[
        str, typer.Argument(help="the DEST of the runs: s3://bucket/prefix or a folder")
    ],
    log_ids: Annotated[list[str], typer.Argument(help="log ids from logs or Prefect artifacts")],
    config: Annotated[Path | None, typer.Option(help="config YAML (for S3 settings)")] = None,
) -> None:
    """Which reported studies under DEST the log ids name (privacy.log_uids: hash)."""
    from tasks.core.config import load_settings
    from tasks.core.privacy import LogNames, find_studies, load_key
    from tasks.screening.monitor import report_location
    from tasks.storage import open_store

    try:
        storage = load_settings(config).storage
        names = LogNames(load_key(open_store(dest, storage), create=False))
        found = find_studies(open_store(f"{dest.rstrip('/')}/studies", storage), names, log_ids)
    except RadflowError as exc:
        raise fail(exc) from None
    missing = 0
    for log_id in log_ids:
        uid = found.get(log_id.strip().lower())
        missing += uid is None
        print(f"{log_id}  {uid or '-'}  {report_location(dest, uid) if uid else 'not found'}")
    if missing:
        raise typer.Exit(1)


@app.command()
def preprocess(
    inputs: Annotated[list[Path], typer.Argument(help="DICOM files")],
    out: Annotated[Path, typer.Option("--out", help="folder for the PNGs")],
    window: Annotated[WindowName, typer.Option(help="grey-level window")] = WindowName.AUTO,
    max_edge: Annotated[int, typer.Option(min=0, help="long edge in px; 0 = no resize")] = 1024,
    header_window: Annotated[
        int, typer.Option(min=0, help="which header window when there are several")
    ] = 0,
    key_images: Annotated[
        str, typer.Option(help="multi-frame objects: middle | spaced:N | montage:RxC")
    ] = "middle",
    provider: Annotated[
        Provider | None, typer.Option(help="write the image as sized for this provider")
    ] = None,
) -> None:
    """Write OUT/<stem>.png per input (OUT/<stem>-<k>.png for several key images): exactly
    what the models would see."""
    from pydantic import ValidationError

    from tasks.imaging.preprocess import prepare_all

    try:
        config = PreprocessConfig(
            window=window, max_edge=max_edge, header_window=header_window, key_images=key_images
        )
    except ValidationError as exc:
        message = "; ".join(f"--{e['loc'][0]}: {e['msg']}".replace("_", "-") for e in exc.errors())
        raise fail(ConfigError(message, hint="see radflow preprocess --help")) from None
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in inputs:
        try:
            images = prepare_all(str(path), config, str(path), [provider] if provider else [])
        except RadflowError as exc:
            failed += 1
            err.print(f"{exc.kind}: {exc.args[0]}", markup=False, highlight=False, soft_wrap=True)
            continue
        for k, image in enumerate(images, 1):
            target = out / (f"{path.stem}.png" if len(images) == 1 else f"{path.stem}-{k}.png")
            png = image.for_provider(provider) if provider else image.png
            w, h = image.sizes[provider.value] if provider else (image.width, image.height)
            target.write_bytes(png)
            frames = f", frames {','.join(map(str, image.frames))}" if image.frames else ""
            print(f"{path} → {target} ({w}×{h}, {image.window}{frames})")
    if failed:
        raise typer.Exit(1)


@app.command()
def simulator(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to listen on")] = 8787,
    latency: Annotated[float, typer.Option(min=0, help="seconds added to every answer")] = 0.0,
    faults: Annotated[
        str | None,
        typer.Option(
            help="KIND:RATE[@MODEL],... e.g. 429:0.1,refusal:0.02,401:1@claude-sonnet-4-6; "
            "kinds: 429 500 529 timeout malformed refusal text_refusal length no_usage 401 403 "
            "404 bad_image no_json_schema (docs/models.md)"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of every random choice")] = 0,
    profile: Annotated[
        list[str] | None, typer.Option(help="MODEL=SENS,SPEC (MODEL may be *); repeatable")
    ] = None,
    retry_after: Annotated[
        float, typer.Option(min=0, help="Retry-After seconds on injected 429s")
    ] = 1.0,
    record_bodies: Annotated[
        bool, typer.Option(help="keep request bodies for GET /bodies")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="no access log")] = False,
) -> None:
    """Offline model server (OpenAI + Anthropic wire protocols) — a TEST DOUBLE for demo and tests."""
    import uvicorn

    from simulator.server import Faults, SimState, create_app, parse_faults
    from simulator.vision import Profile

    try:
        rates = parse_faults(faults)
        profiles = {}
        for item in profile or []:
            name, _, values = item.partition("=")
            sens, _, spec = values.partition(",")
            profiles[name] = Profile(float(sens), float(spec))
    except ValueError as exc:
        raise fail(exc) from None
    state = SimState(
        seed=seed,
        latency=latency,
        profiles=profiles,
        faults=Faults(rates, retry_after=retry_after),
        record_bodies=record_bodies,
    )
    err.print(
        f"radflow simulator — a TEST DOUBLE, not a medical model — on http://{host}:{port}"
        f" (latency {latency:g} s, faults {faults or 'none'}, seed {seed})",
        highlight=False,
    )
    uvicorn.run(
        create_app(state),
        host=host,
        port=port,
        log_level="warning" if quiet else "info",
        access_log=not quiet,
        timeout_keep_alive=30,
        backlog=4096,
    )


@app.command("build-dataset")
def build_dataset(
    annotations: Annotated[str, typer.Argument(help="annotations .csv or .jsonl (local or s3://)")],
    images: Annotated[str, typer.Option("--images", help="folder or s3:// prefix of the DICOMs")],
    out: Annotated[str, typer.Option("--out", help="destination folder or s3:// prefix")],
    val_fraction: Annotated[
        float, typer.Option(min=0, max=0.5, help="share of patients for validation")
    ] = 0.2,
    upload: Annotated[
        bool, typer.Option(help="upload and create a fine-tuning job (config's OpenAI endpoint)")
    ] = False,
    config: Annotated[
        Path | None, typer.Option(help="config YAML (else $RADFLOW_CONFIG, ./radflow.yaml)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the patient split and the job")] = 0,
    base_model: Annotated[str, typer.Option(help="model to fine-tune")] = "gpt-4o-2024-08-06",
    epochs: Annotated[int | None, typer.Option(min=1, max=50, help="n_epochs (else auto)")] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, max=256, help="batch_size (else auto)")
    ] = None,
    lr_multiplier: Annotated[
        float | None, typer.Option(min=0.0001, max=100, help="learning_rate_multiplier")
    ] = None,
    suffix: Annotated[str | None, typer.Option(help="fine-tuned model name suffix")] = None,
    token_limit: Annotated[
        int, typer.Option(min=1024, help="tokens per example (longer ones are rejected)")
    ] = 65_536,
    price_per_mtok: Annotated[
        float, typer.Option(min=0, help="USD per million training tokens (estimate)")
    ] = 25.0,
) -> None:
    """Build a vision fine-tuning dataset (train/validation JSONL + manifest) from annotations."""
    from flows.dataset import build_finetune_dataset
    from tasks.core.config import load_settings
    from tasks.storage import open_store

    try:
        settings = load_settings(config)  # fail fast, before a Prefect run exists
        for uri in (images, out):
            open_store(uri, settings.storage)  # a missing bucket: one line, no flow run
        manifest = build_finetune_dataset(
            annotations,
            images,
            out,
            val_fraction=val_fraction,
            upload=upload,
            config=str(config) if config else None,
            seed=seed,
            base_model=base_model,
            n_epochs=epochs,
            batch_size=batch_size,
            learning_rate_multiplier=lr_multiplier,
            suffix=suffix,
            token_limit=token_limit,
            price_per_mtok=price_per_mtok,
        )
    except RadflowError as exc:
        raise fail(exc) from None
    train, val, est = manifest["train"], manifest["validation"], manifest["estimate"]
    Console().print(
        f"train {train['examples']} examples ({len(train['patients'])} patients), validation "
        f"{val['examples']} ({len(val['patients'])} patients), "
        f"{manifest['rejected']['count']} rejected (rejected.jsonl); "
        f"≈{est['training_tokens']} training tokens over {est['epochs']} epochs, "
        f"≈${est['cost_usd']:.2f} → {out}",
        highlight=False,
    )
    if manifest["upload"]:
        up = manifest["upload"]
        Console().print(
            f"uploaded training file {up['training_file']}, validation file "
            f"{up['validation_file']}; fine-tuning job {up['job_id']} ({up['status']})",
            highlight=False,
        )


@app.command()
def evaluate(
    labels: Annotated[
        str,
        typer.Argument(
            help="labels CSV: study_instance_uid,abnormal[,patient_id,findings]; or "
            "reviews:DEST, the review verdicts stored under a screening DEST"
        ),
    ],
    images: Annotated[str, typer.Option("--images", help="folder or s3:// prefix of the DICOMs")],
    out: Annotated[str, typer.Option("--out", help="destination folder or s3:// prefix")],
    config: Annotated[
        Path | None, typer.Option(help="config YAML (else $RADFLOW_CONFIG, ./radflow.yaml)")
    ] = None,
    margin: Annotated[
        float | None,
        typer.Option(min=0, max=1, help="regression margin (else evaluation.regression_margin)"),
    ] = None,
) -> None:
    """Measure every model and the consensus against labelled studies (DEST/metrics.json);
    exit 1 when sensitivity or specificity dropped beyond the margin since the last run."""
    import asyncio

    from flows.evaluate import evaluate_accuracy
    from tasks.core.config import load_settings
    from tasks.evaluation.outputs import read_labels

    async def run() -> tuple[object, object]:
        cfg = str(config) if config else None
        state = await evaluate_accuracy(
            labels=labels, images=images, out=out, config=cfg, margin=margin, return_state=True
        )
        return state, await state.aresult(raise_on_failure=False)

    try:
        settings = load_settings(config)  # fail fast, before a Prefect run exists
        read_labels(labels, settings.storage)
        state, result = asyncio.run(run())
    except RadflowError as exc:
        raise fail(exc) from None
    if isinstance(result, BaseException):
        from tasks.core.errors import EvaluationRegression

        raise fail(result, code=1 if isinstance(result, EvaluationRegression) else 2)
    shown = ("sensitivity", "specificity", "auroc", "cohen_kappa")
    for name, m in {"consensus": result["consensus"], **result["models"]}.items():
        cells = []
        for k in shown:
            lo, hi = m["ci95"][k]
            value = "–" if m[k] is None else f"{m[k]:.3f}"
            cells.append(f"{k} {value}" + (f" ({lo:.3f}–{hi:.3f})" if lo is not None else ""))
        Console().print(f"{name}: n={m['n']}  " + "  ".join(cells), highlight=False)
    Console().print(f"metrics, reliability, plots → {out}", highlight=False)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="folder for samples, config and reports")] = Path(
        "demo-output"
    ),
    synthetic: Annotated[int, typer.Option(min=0, help="synthetic studies to add")] = 6,
    latency: Annotated[float, typer.Option(min=0, help="simulated model latency (s)")] = 0.5,
    language: Annotated[str, typer.Option(help="report language: ko | en")] = "ko",
) -> None:
    """Run the whole screening flow on sample studies against the simulator."""
    from flows.demo import run_demo

    try:
        run_demo(out, synthetic=synthetic, latency=latency, language=language)
    except RadflowError as exc:
        raise fail(exc) from None


@app.command()
def bridge(
    queue_url: Annotated[
        str | None, typer.Option(help="SQS queue receiving the bucket's S3 events")
    ] = None,
    orthanc: Annotated[
        str | None,
        typer.Option(help="an Orthanc to follow (http(s)://HOST:PORT): its stable studies"),
    ] = None,
    quiet_seconds: Annotated[
        float, typer.Option(min=0, help="a study is complete after this long without uploads")
    ] = 5.0,
    wait_seconds: Annotated[
        int, typer.Option(min=0, max=20, help="SQS long-poll time per receive")
    ] = 1,
    state: Annotated[
        Path, typer.Option(help="--orthanc: file keeping the change-feed cursor across restarts")
    ] = Path(".radflow/orthanc-bridge.json"),
    since: Annotated[
        str, typer.Option(help="--orthanc, first start only: now | start (every past change)")
    ] = "now",
    dicomweb_root: Annotated[
        str, typer.Option(help="--orthanc: the DICOMweb plugin's root (DicomWeb.Root)")
    ] = "/dicom-web",
    poll_seconds: Annotated[
        float, typer.Option(min=0.1, help="--orthanc: wait between polls of the change feed")
    ] = 1.0,
    config: Annotated[
        Path | None, typer.Option(help="config YAML: `dicomweb` holds Orthanc's credentials")
    ] = None,
) -> None:
    """Uploads → one `radflow.study.ready` Prefect event per study: S3 notifications on SQS
    (--queue-url), or the stable studies of an Orthanc's change feed (--orthanc)."""
    import logging

    from flows.bridge import emit_study_event, run_bridge

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "botocore", "urllib3", "dicomweb_client"):  # a line per request
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if (queue_url is None) == (orthanc is None):
        raise fail(ConfigError("give one of --queue-url (S3 via SQS) or --orthanc URL"))
    try:
        if orthanc is not None:
            from tasks.core.config import load_settings
            from tasks.pacs.orthanc import OrthancBridge

            if since not in ("now", "start"):
                raise ConfigError(f'--since "{since}" is not one of now, start')
            follower = OrthancBridge(
                orthanc,
                state,
                load_settings(config).dicomweb,
                dicomweb_root=dicomweb_root,
                start=since,
            )
            follower.run(emit_study_event, poll_seconds)
        else:
            run_bridge(str(queue_url), quiet_seconds, wait_seconds=wait_seconds)
    except RadflowError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        err.print("bridge stopped; what was not acknowledged is handled after a restart")


@app.command()
def serve(
    prefect_file: Annotated[
        Path | None, typer.Option(help="deployments file (default: deployments/prefect.yaml)")
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option(help="serve only this deployment; repeatable")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="flow runs at once")] = None,
    poll_seconds: Annotated[
        float, typer.Option(min=0.5, help="how often to look for runs to start")
    ] = 2.0,
    warm: Annotated[
        bool,
        typer.Option(
            help="run event-triggered deployments (on-upload) in this already-imported "
            "process instead of a new interpreter per run (saves seconds per upload)"
        ),
    ] = True,
) -> None:
    """Serve the deployments of deployments/prefect.yaml in-process (no work pool); with
    limits: global, first create or update the models' limits (radflow limits sync)."""
    from flows.limits_cli import sync_from_config
    from flows.serve import DEFAULT_PREFECT_FILE
    from flows.serve import serve as serve_deployments
    from tasks.core.config import load_settings
    from tasks.screening.shards import HEARTBEAT_ENV

    for name, value in HEARTBEAT_ENV.items():  # shard runs' heartbeats: the crash watch's
        os.environ.setdefault(name, value)
    try:
        settings = load_settings(None)  # $RADFLOW_CONFIG or ./radflow.yaml, as the runs load it
        if settings.limits == "global":  # the runs' limits exist before any run starts
            Console().print(sync_from_config(settings))
        serve_deployments(prefect_file or DEFAULT_PREFECT_FILE, only, limit, poll_seconds, warm)
    except RadflowError as exc:
        raise fail(exc) from None


from flows.limits_cli import limits  # noqa: E402 — `radflow limits sync`
from flows.review_cli import reviews  # noqa: E402 — `radflow reviews list|export`
from flows.runs_cli import runs  # noqa: E402 — `radflow runs compare`

app.add_typer(limits, name="limits")
app.add_typer(reviews, name="reviews")
app.add_typer(runs, name="runs")

if __name__ == "__main__":
    sys.exit(app())
