"""``wsimtl probe``: a linear classifier on frozen encoder features, cross-validated and saved."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ._options import check_model, device_option, precision_option


@click.command("probe")
@click.argument("source", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--labels", "labels_csv", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="CSV of key,label: image paths relative to SOURCE (a folder of images) or patch ids (an embed result folder).")
@click.option("--key-column", default=None, help="Column of the image path or patch id (default: file/image/path/name/id).")
@click.option("--label-column", default=None, help="Column of the class (default: label, label_name*, label*, grade*, class*).")
@click.option("--model", "model", default=None, metavar="NAME|DIR|FILE",
              help="Encoder for a folder of images: as `wsimtl embed --model` (default wsimtl-small).")
@click.option("--arch", type=click.Choice(["resnet50", "densenet121"]), default=None, help="Architecture of an external checkpoint.")
@click.option("--image-mpp", type=click.FloatRange(min=0.01, max=100.0), default=None,
              help="Resolution of the images in um/px; they are rescaled to the encoder's (default: taken as the encoder's).")
@click.option("--levels", type=click.Choice(["deepest", "all"]), default="deepest", show_default=True, help="Encoder levels pooled into the features.")
@click.option("--classifier", "kind", type=click.Choice(["logreg", "svm"]), default="logreg", show_default=True,
              help="Logistic regression or linear SVM (squared hinge), L2-regularised.")
@click.option("-C", "C", type=click.FloatRange(min=0.0, min_open=True), default=1.0, show_default=True, help="Inverse regularisation strength.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="Folds of the stratified cross-validation.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fold assignment.")
@click.option("--name", default=None, help="Name of the saved head (default: the -o file's name, else the labels file's stem).")
@click.option("-o", "--out", "out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Where to save the classifier (default: <name>.probe.json in the current folder).")
@device_option
@precision_option
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON on stdout instead of text.")
def probe(source: Path, labels_csv: Path, key_column: str | None, label_column: str | None, model: str | None, arch: str | None,
          image_mpp: float | None, levels: str, kind: str, C: float, folds: int, seed: int, name: str | None, out: Path | None,
          device: str, precision: str, as_json: bool) -> None:
    """Fit a linear classifier on frozen features of labelled images (SOURCE a folder of images) or patches
    (SOURCE an `embed` result folder); report k-fold accuracy and macro F1; save it for `embed --probe`."""
    from ..devices import resolve_device, resolve_precision
    from ..probe import (cross_validate, features_from_images, features_from_result, fit_linear, head_accuracy,
                         is_image_folder, load_labels, save_probe)

    labels = load_labels(labels_csv, key_column=key_column, label_column=label_column)
    name = name or (out.name.removesuffix(".probe.json").removesuffix(".json") if out else labels_csv.stem)
    if is_image_folder(source):
        from ..embed import load_encoder
        from ..network.external import is_external_checkpoint

        if model is None or not is_external_checkpoint(model):
            check_model(model, allow_untrained=False)
        dev = resolve_device(device)
        encoder = load_encoder(model, device=dev, arch=arch)
        data = features_from_images(source, labels, encoder, image_mpp=image_mpp, levels=levels, device=dev,
                                    precision=resolve_precision(dev, precision))
        enc_info = encoder.describe()
    else:
        from ..embed import open_embeddings

        data = features_from_result(source, labels)
        enc_info = dict(open_embeddings(source).attrs.get("encoder") or {})
        levels = str(open_embeddings(source).attrs.get("levels", "deepest"))
    cv = cross_validate(data.features, data.labels, data.classes, folds=folds, kind=kind, C=C, seed=seed)
    heads = head_accuracy(data)
    head = fit_linear(data.features, data.labels, data.classes, kind=kind, C=C, name=name, levels=levels)
    path = save_probe(head, out or Path(f"{name}"), encoder=enc_info, cv=cv)
    report = {"n": cv["n"], "classes": data.classes, "accuracy": cv["accuracy"], "macro_f1": cv["macro_f1"],
              "accuracy_sd": cv["accuracy_sd"], "folds": folds, "classifier": kind, "C": C, "encoder_heads": heads,
              "saved": str(path)}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{cv['n']} examples, {len(data.classes)} classes, {data.features.shape[1]} features ({enc_info.get('name', '?')}, {levels})")
    click.echo(f"{folds}-fold {kind}: accuracy {cv['accuracy']:.3f} (sd {cv['accuracy_sd']:.3f}), macro F1 {cv['macro_f1']:.3f}")
    for h, m in heads.items():
        click.echo(f"encoder head {h}: accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}")
    click.echo(f"classifier saved: {path} (apply it with `wsimtl embed SLIDE --probe {path}`)")
