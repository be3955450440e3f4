"""What ``--ckpt_path FILE`` does to the model settings the user gave: nothing is replaced silently.

LightningCLI rebuilds the model of ``validate``/``test``/``predict``/``fit --ckpt_path FILE`` from the
checkpoint's ``hyper_parameters``, parsed over the user's config, so every model value given in YAML or
on the command line loses to the checkpoint's without a word. :func:`reconcile_model_config` runs right
after that merge and sorts each value the user gave (read from a parse without defaults) that differs
from the checkpoint's, by the module's declared ``architecture_hparams`` and ``runtime_hparams``
(and its optional ``saved_hparam(name, value)``, the value as its checkpoint stores it):

* architecture settings (the network and what its weights mean) are refused with a
  :class:`ConfigError`: the checkpoint's weights cannot serve another network;
* run settings (test-time augmentation, memory format, compilation, where the initial weights come
  from before the checkpoint's replace them) take the user's value, said in one line;
* every other (training) setting keeps the checkpoint's value: a warning for ``validate``/``test``/
  ``predict``; for ``fit`` (resuming) an error, as the resumed run would not continue as if never
  stopped (its optimizer and schedule state come from the checkpoint, the new value would be ignored).

A module that declares neither (any LightningModule other than the recipe) keeps Lightning's rule,
the checkpoint's values, with a warning naming the given values that differ.

Example::

    given = parser.parse_args(args, defaults=False)  # only what the user wrote
    before = cli.config.clone()
    merge()  # Lightning: the checkpoint's hyper-parameters over the config
    reconcile_model_config("test", "best.ckpt", given["test"], before["test"], cli.config["test"], saved)
"""

from __future__ import annotations

import dataclasses
import inspect
import pydoc
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_tricks._cli_errors import ConfigError
from lightning_tricks.interface import CONFIGURED_HPARAMS_KEY

_MISSING = object()


def checkpoint_hparams(ckpt_path: str) -> dict[str, Any]:
    """The hyper-parameters a checkpoint's run was configured with, read without loading its tensors
    (memory-mapped): the recipe's copy from before callbacks rewrote any (``LRFinder`` records the rate
    it applied), else Lightning's ``hyper_parameters``."""
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not the zip format that mmap needs: read it whole
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = dict(checkpoint.get(CONFIGURED_HPARAMS_KEY) or checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    return hparams


def class_path_for_bare_hparams(ckpt_path: str, saved: dict[str, Any], configured: str) -> str:
    """The model class for a checkpoint whose hyper-parameters hold no ``_class_path``.

    LightningCLI's ``fit`` stores the model's class path in its checkpoints; a plain ``Trainer.fit``
    does not, so the configured ``model.class_path`` (which the parser requires) names the class, if
    the checkpoint's hyper-parameters are init arguments of it.

    Raises:
        ConfigError: the hyper-parameters do not fit the configured class.
    """
    module_class = pydoc.locate(configured)
    if not callable(module_class):
        return configured  # the parser reports the unknown class
    parameters = inspect.signature(module_class).parameters.values()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return configured
    unknown = sorted(set(saved) - {parameter.name for parameter in parameters})
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise ConfigError(
            "model.class_path",
            configured,
            f"does not fit {ckpt_path}, which holds no class path (saved by a plain Trainer.fit): its hyper-"
            f"parameters {', '.join(unknown[:3])}{more} are not init arguments of {module_class.__name__}",
            "set model.class_path (e.g. --model ImageClassifier) to the class the checkpoint was "
            "trained with",
        )
    return configured


@dataclass(frozen=True)
class Difference:
    """A value the user gave for ``key`` that differs from the checkpoint's."""

    key: str  # the full config key, e.g. "model.init_args.optimizer.lr"
    argument: str  # the module's init argument it belongs to, e.g. "optimizer"
    given: Any
    saved: Any

    def __str__(self) -> str:
        return f"{self.key}={self.given!r} (checkpoint: {self.saved!r})"


def _plain(value: Any) -> Any:
    """Namespaces and dataclasses as dicts, tuples as lists, recursively: comparable with a checkpoint's."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _leaves(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """``(path, value)`` of each value the user wrote; an empty dict is a value of its own."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _leaves(item, (*path, str(key)))
    else:
        yield path, value


def _dig(value: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _config_class(module_class: type | None, argument: str) -> type | None:
    """The dataclass an init argument is built into (``OptimizerConfig | None``), if any."""
    if module_class is None:
        return None
    try:
        hint = typing.get_type_hints(module_class.__init__).get(argument)
    except Exception:  # unresolvable annotations: compare the values as written
        return None
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _as_saved(module_class: type | None, argument: str, value: Any) -> Any:
    """``value`` the way the module stores it in its hyper-parameters: by the module's
    ``saved_hparam(name, value)`` when it has one, else a config dataclass's resolved fields
    (``momentum: null`` of SGD is saved as its 0.9), else as written."""
    saved_hparam = getattr(module_class, "saved_hparam", None)
    if callable(saved_hparam):
        try:
            return saved_hparam(argument, value)
        except Exception:  # an invalid config: compare as written (the module reports it when built)
            return value
    config_class = _config_class(module_class, argument)
    if config_class is not None and isinstance(value, dict):
        try:
            return dataclasses.asdict(config_class(**value))
        except Exception:  # an invalid config: compare as written (the module reports it when built)
            return value
    return value


def differences(
    given: dict[str, Any],
    resolved: dict[str, Any],
    saved: dict[str, Any],
    module_class: type | None,
    skip: tuple[str, ...] = (),
) -> list[Difference]:
    """Values in ``given`` (init args the user wrote) that differ from ``saved`` (the checkpoint's).

    ``resolved`` is the parsed config with its defaults, from which a config dataclass is rebuilt so a
    partial ``optimizer: {lr: 0.1}`` compares with the checkpoint's fully resolved optimizer.
    Arguments in ``skip`` (linked from the DataModule when the model is built) are not compared.
    """
    found = []
    for argument, value in given.items():
        if argument in skip or argument not in saved:
            continue
        full = _plain(resolved.get(argument, value))
        normalised = _plain(_as_saved(module_class, argument, full))
        plain = {argument: _plain(value)}
        for path, _ in _leaves(plain[argument]):
            path = _saved_part(saved, (argument, *path))
            theirs, written = _plain(_dig(saved, path)), _dig(plain, path)
            if theirs is _MISSING or written == theirs or any(diff.key == _key(path) for diff in found):
                continue
            mine = _dig({argument: normalised}, path)
            if mine is _MISSING or mine != theirs:  # differs as written and as the module saves it
                found.append(Difference(_key(path), argument, written, theirs))
    return found


def _key(path: tuple[str, ...]) -> str:
    return ".".join(("model.init_args", *path))


def _saved_part(saved: dict[str, Any], path: tuple[str, ...]) -> tuple[str, ...]:
    """The longest start of ``path`` the checkpoint holds: ``model_kwargs`` for ``model_kwargs.width``
    when the checkpoint's ``model_kwargs`` is ``None``."""
    for end in range(1, len(path)):
        if not isinstance(_dig(saved, path[:end]), dict):
            return path[:end]
    return path


def _with_others(first: Difference, others: list[Difference]) -> str:
    rest = [str(other) for other in others if other is not first]
    return f" (also {'; '.join(rest)})" if rest else ""


def reconcile_model_config(
    subcommand: str,
    ckpt_path: str,
    given: Any,
    before: Any,
    merged: Any | None,
    saved: dict[str, Any],
    linked: tuple[str, ...] = (),
) -> None:
    """Refuse, apply or warn about the model values the user gave that differ from the checkpoint's.

    Args:
        subcommand: ``fit`` (resuming), ``validate``, ``test`` or ``predict``.
        ckpt_path: The checkpoint file, named in the messages.
        given: The subcommand's config parsed without defaults (only what the user wrote).
        before: The subcommand's parsed config before the checkpoint's hyper-parameters were merged.
        merged: The subcommand's config after that merge; run settings the user gave are put back here.
            ``None`` when no merge happened (``--ckpt_path last``, resolved once the trainer is built):
            the user's values are then in effect, and only the refusals apply.
        saved: The checkpoint's ``hyper_parameters``.
        linked: Init args linked from the DataModule when the model is built (not compared here).

    Raises:
        ConfigError: a differing architecture setting, or a differing training setting when resuming.
    """
    given_model = given.get("model") if given is not None else None
    if not isinstance(given_model, Namespace):
        return
    module_path = saved.get("_class_path") or (before if merged is None else merged).get("model.class_path")
    given_path = given_model.get("class_path")
    module_class = pydoc.locate(module_path) if isinstance(module_path, str) else None
    if isinstance(given_path, str) and module_path and pydoc.locate(given_path) is not module_class:
        raise ConfigError(
            "model.class_path",
            given_path,
            f"differs from the checkpoint's {module_path!r} ({ckpt_path}): its weights belong to that class",
            f"leave model.class_path out to {subcommand} the checkpoint's {module_path.rsplit('.', 1)[-1]}, "
            "or pass a checkpoint trained with this class",
        )
    found = differences(
        _plain(given_model.get("init_args") or {}),
        _plain(before.get("model.init_args") or {}),
        saved,
        module_class,
        skip=linked,
    )
    if not found:
        return
    architecture = getattr(module_class, "architecture_hparams", None)
    runtime = getattr(module_class, "runtime_hparams", None)
    if architecture is None or runtime is None:
        if merged is None:
            return
        rank_zero_warn(
            f"`{subcommand} --ckpt_path {ckpt_path}` builds the model from the checkpoint's hyper-parameters "
            f"(Lightning's rule), not from these given values: {'; '.join(map(str, found))}"
        )
        return
    refused = [diff for diff in found if diff.argument in architecture]
    if refused:
        first = refused[0]
        raise ConfigError(
            first.key,
            first.given,
            f"differs from the checkpoint's {first.saved!r} ({ckpt_path}): it changes the network whose "
            f"weights the checkpoint holds{_with_others(first, refused)}",
            f"set {first.key}={first.saved!r} (or leave it out) to use the checkpoint, or pass a "
            f"checkpoint trained with {first.key}={first.given!r}",
        )
    applied = [diff for diff in found if diff.argument in runtime]
    training = [diff for diff in found if diff.argument not in runtime]
    if subcommand == "fit" and training:
        first = training[0]
        raise ConfigError(
            first.key,
            first.given,
            f"differs from the checkpoint's {first.saved!r} ({ckpt_path}): a resumed run continues with "
            "the checkpoint's training settings and optimizer state, so the run would not go on as if never "
            "stopped" + _with_others(first, training),
            f"set {first.key}={first.saved!r} (or leave it out) to resume the run as it was, or start a "
            f"new run from these weights: model.init_args.pretrained={ckpt_path} without --ckpt_path",
        )
    if merged is None:
        return
    for argument in dict.fromkeys(diff.argument for diff in applied):
        merged["model"]["init_args"][argument] = before["model"]["init_args"][argument]
    if applied:
        rank_zero_info(
            f"{subcommand}: from the config, not the checkpoint: {'; '.join(map(str, applied))} "
            "(settings that do not change the network)"
        )
    if training:
        rank_zero_warn(
            f"`{subcommand}` keeps the checkpoint's training settings, which only set how its weights were "
            f"trained; ignored given values: {'; '.join(map(str, training))}"
        )


def check_linked_args(module: Any, saved: dict[str, Any], ckpt_path: str, linked: tuple[str, ...]) -> None:
    """Refuse a DataModule whose linked ``num_classes``/``in_channels`` differ from the checkpoint's.

    The CLI links them into the model when it is built, after the checkpoint's values were merged, so a
    different DataModule would otherwise end in a tensor size mismatch while loading the weights.
    """
    architecture = getattr(type(module), "architecture_hparams", ())
    hparams = getattr(module, "hparams", {})
    for name in linked:
        if name in architecture and name in hparams and name in saved and hparams[name] != saved[name]:
            raise ConfigError(
                f"model.init_args.{name}",
                hparams[name],
                f"(linked from data.{name}) differs from the checkpoint's {saved[name]!r} ({ckpt_path}): "
                "the DataModule gives another shape than the network was trained on",
                "use the DataModule and data settings the checkpoint was trained with, or a checkpoint "
                f"trained on this data ({name}={hparams[name]!r})",
            )
