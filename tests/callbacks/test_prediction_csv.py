"""PredictionCSVWriter and the `predict` subcommand's predictions file."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import (
    PlainClassifier,
    ddp_trainer_kwargs,
    digits_tensors,
    quiet_trainer_kwargs,
    write_digits_recipe_config,
)
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks.callbacks import PredictionCSVWriter
from lightning_tricks.cli import build_cli, main


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


class ProbabilityClassifier(PlainClassifier):
    """The plain classifier whose ``predict_step`` returns class probabilities."""

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0]).softmax(dim=1)


def expected_rows(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, Any]]:
    """The rows computed here, without the writer: argmax of the model's softmax on the same inputs."""
    model.eval()
    with torch.no_grad():
        best, predicted = model(x).softmax(dim=1).max(dim=1)
    return [
        {"index": str(i), "predicted": str(int(p)), "probability": float(b), "label": str(int(t))}
        for i, (p, b, t) in enumerate(zip(predicted, best, y, strict=True))
    ]


def assert_rows_match(rows: list[dict[str, str]], expected: list[dict[str, Any]]) -> None:
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected, strict=True):
        assert {k: row[k] for k in ("index", "predicted", "label")} == {
            k: want[k] for k in ("index", "predicted", "label")
        }
        assert float(row["probability"]) == pytest.approx(want["probability"], rel=1e-5)


def test_predict_command_writes_the_models_argmax_for_every_sample_in_order(tmp_path, caplog):
    config = write_digits_recipe_config(tmp_path, {"model": "small_cnn"})
    with caplog.at_level("INFO"):
        cli = build_cli(["predict", f"--config={config}"])
    path = tmp_path / "predictions.csv"  # no logger: the run folder is default_root_dir
    dataset = cli.datamodule.predict_dataloader().dataset
    x, y = dataset.tensors
    # the DataModule normalises batches on the device, before predict_step
    assert_rows_match(read_rows(path), expected_rows(cli.model, cli.datamodule.normalize_images(x), y))
    assert len(dataset) == 360
    assert f"Wrote 360 predictions to {path}" in caplog.text
    assert path.read_text().splitlines()[0] == "index,predicted,probability,label"


def prediction_writers(cli) -> list[PredictionCSVWriter]:
    return [c for c in cli.trainer.callbacks if isinstance(c, PredictionCSVWriter)]


@pytest.mark.parametrize(
    ("value", "written"), [("null", None), ("out/digits.csv", "out/digits.csv")], ids=["off", "path"]
)
def test_predictions_file_sets_the_path_or_turns_the_file_off(tmp_path, value, written):
    config = write_digits_recipe_config(tmp_path, {"model": "small_cnn"})
    cli = build_cli(["predict", f"--config={config}", f"--predictions_file={value}"])
    writers = prediction_writers(cli)
    csv_files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.csv"))
    assert csv_files == ([] if written is None else [written])
    assert len(writers) == (0 if written is None else 1)


def test_fit_and_test_get_no_prediction_writer(tmp_path):
    config = write_digits_recipe_config(tmp_path, {"model": "small_cnn"}, limit_test_batches=1)
    cli = build_cli(["test", f"--config={config}"])
    assert not prediction_writers(cli)


def digits_predict_loader(n: int = 100) -> tuple[DataLoader, torch.Tensor, torch.Tensor]:
    x, y = digits_tensors(n)
    return DataLoader(TensorDataset(x, y), batch_size=32), x, y


class FailsAtBatch(ProbabilityClassifier):
    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 2:
            raise RuntimeError("prediction failed")
        return super().predict_step(batch, batch_idx, dataloader_idx)


def test_an_error_leaves_an_earlier_file_intact_and_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "predictions.csv"
    path.write_text("earlier\n")
    loader, _, _ = digits_predict_loader()
    trainer = L.Trainer(**quiet_trainer_kwargs(tmp_path), callbacks=[PredictionCSVWriter(path)])
    with pytest.raises(RuntimeError, match="prediction failed"):
        trainer.predict(FailsAtBatch(), loader)  # two batches done, none written
    assert path.read_text() == "earlier\n"

    def failing_fsync(fd: int) -> None:  # the disk fails after the rows went into the temporary file
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    trainer = L.Trainer(**quiet_trainer_kwargs(tmp_path), callbacks=[PredictionCSVWriter(path)])
    with pytest.raises(OSError, match="disk full"):
        trainer.predict(ProbabilityClassifier(), loader)
    assert path.read_text() == "earlier\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["predictions.csv"]


class ReturnsLogitsPerSample(ProbabilityClassifier):
    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0]).argmax(dim=1)


def test_predictions_that_are_not_class_scores_are_refused(tmp_path):
    loader, _, _ = digits_predict_loader(40)
    trainer = L.Trainer(**quiet_trainer_kwargs(tmp_path), callbacks=[PredictionCSVWriter(tmp_path / "p.csv")])
    with pytest.raises(ValueError, match=r"shape \(batch, classes\), got shape \(32,\)"):
        trainer.predict(ReturnsLogitsPerSample(), loader)
    assert not (tmp_path / "p.csv").exists()


def test_an_empty_path_is_refused():
    with pytest.raises(ValueError, match="path=''"):
        PredictionCSVWriter("")


def test_a_folder_as_path_is_refused_before_predicting(tmp_path):
    loader, _, _ = digits_predict_loader(40)
    model = ProbabilityClassifier()
    predicted = []
    model.on_predict_batch_end = lambda *args: predicted.append(args)
    trainer = L.Trainer(**quiet_trainer_kwargs(tmp_path), callbacks=[PredictionCSVWriter(tmp_path)])
    with pytest.raises(ValueError, match=r"is a folder; give a file name inside it"):
        trainer.predict(model, loader)
    assert predicted == []
    assert not list(tmp_path.rglob("*.csv"))


def test_an_empty_predictions_file_names_the_console_option(tmp_path, capsys):
    config = write_digits_recipe_config(tmp_path, {"model": "small_cnn"})
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", f"--config={config}", "--predictions_file="])
    err = capsys.readouterr().err
    assert exit_info.value.code not in (0, None), err
    assert "predictions_file=''" in err and "fix: --predictions_file=predictions.csv" in err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("*.csv"))


def predict_on_two_ranks(directory):
    torch.manual_seed(0)
    model = ProbabilityClassifier()
    loader, _, _ = digits_predict_loader(75)  # uneven: 38 and 37 samples per rank
    trainer = L.Trainer(**ddp_trainer_kwargs(directory), callbacks=[PredictionCSVWriter(directory / "p.csv")])
    trainer.predict(model, loader, return_predictions=False)
    return model.state_dict()


@pytest.mark.ddp(scenario=predict_on_two_ranks)
def test_ddp_ranks_rows_end_up_in_one_file_in_dataset_order(ddp_scenario):
    model = ProbabilityClassifier()
    model.load_state_dict(ddp_scenario.results[0])
    _, x, y = digits_predict_loader(75)
    assert_rows_match(read_rows(ddp_scenario.directory / "p.csv"), expected_rows(model, x, y))
