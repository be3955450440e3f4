"""Readable console errors: one message per problem naming the config key, the value and a fix.

jsonargparse wraps an argument's ``ValueError`` into nested "Does not validate against any of the
Union subtypes ... Given value: Namespace(...)" dumps, and errors raised while a run is set up end
in a long traceback. :func:`run_reporting_errors` turns both into a few last lines such as::

    error: trainer.callbacks[2].init_args.decay (EMA): `decay` must be a float in (0, 1), got 1.5.
      fix: set trainer.callbacks[2].init_args.decay to an allowed value, e.g. 0.999 (its default)
      (run with --debug or LIGHTNING_TRICKS_DEBUG=1 to see the traceback)

Hand-written because neither jsonargparse nor LightningCLI map an error back to the config key of
the class that raised it; this module finds the key from the failing object's frame and the
parsed config, and only ever runs on the error path.

Example::

    args, debug = pop_debug_flag(sys.argv[1:])
    run_reporting_errors(lambda: build_cli(args, exit_on_error=False), debug=debug)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

DEBUG_FLAG = "--debug"
DEBUG_ENV = "LIGHTNING_TRICKS_DEBUG"
DEBUG_HINT = f"(run with {DEBUG_FLAG} or {DEBUG_ENV}=1 to see the traceback)"
# Exit status of a command-line (parse) error, as argparse uses; every other error exits with 1.
PARSE_ERROR_STATUS = 2


class ConfigError(ValueError):
    """A configuration value that cannot work: the key, the value, what is allowed and a fix.

    Example::

        raise ConfigError("trainer.max_epochs", 0, "must be >= 1 (0 trains nothing)", "trainer.max_epochs=10")
    """

    def __init__(self, key: str, value: Any, problem: str, fix: str) -> None:
        self.key, self.value, self.problem, self.fix = key, value, problem, fix
        super().__init__(f"{key}={value!r} {problem}; fix: {fix}")


def pop_debug_flag(args: list[str] | None) -> tuple[list[str] | None, bool]:
    """Remove ``--debug`` from ``args`` (``sys.argv`` in place when ``None``); report debug mode.

    Debug mode is on with the flag or with the environment variable ``LIGHTNING_TRICKS_DEBUG`` set to
    anything but ``""``/``0``/``false``.
    """
    argv = sys.argv if args is None else list(args)
    start = 1 if args is None else 0
    flagged = DEBUG_FLAG in argv[start:]
    if flagged:
        argv[start:] = [arg for arg in argv[start:] if arg != DEBUG_FLAG]
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return (None if args is None else argv), flagged or env


def run_reporting_errors(fn: Callable[[], Any], debug: bool = False) -> Any:
    """Call ``fn``; on an error print :func:`describe_error`'s lines to stderr and exit non-zero.

    With ``debug`` the error propagates with its traceback. ``SystemExit`` (``--help``, jsonargparse's
    own exits) and ``KeyboardInterrupt`` always propagate.
    """
    try:
        return fn()
    except Exception as err:
        if debug:
            raise
        lines = describe_error(err)
        sys.stderr.flush()
        print("\n".join([*lines, f"  {DEBUG_HINT}"]), file=sys.stderr, flush=True)
        status = PARSE_ERROR_STATUS if isinstance(err, argparse.ArgumentError) else 1
        raise SystemExit(status) from None


# -- locating the failure ---------------------------------------------------------------------------
def _frames(tb: TracebackType | None) -> Iterator[Any]:
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def _raised_by_jsonargparse(err: BaseException) -> bool:
    frames = list(_frames(err.__traceback__))
    return bool(frames) and f"{os.sep}jsonargparse{os.sep}" in frames[-1].f_code.co_filename


def root_error(err: BaseException) -> BaseException:
    """The error under jsonargparse's re-raised wrappers (the one the failing class raised)."""
    while err.__cause__ is not None and _raised_by_jsonargparse(err):
        err = err.__cause__
    return err


def _find_cli(err: BaseException) -> Any:
    from lightning.pytorch.cli import LightningCLI

    for frame in _frames(err.__traceback__):
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, LightningCLI):
            return candidate
    return None


def _failing_objects(err: BaseException, outer: BaseException) -> list[Any]:
    """``self`` of the frames from the innermost outwards, along the chain from ``err`` to ``outer``."""
    chain = [err]
    current = outer
    while current is not None and current is not err:
        chain.append(current)
        current = current.__cause__
    from lightning.pytorch import Trainer

    objects: list[Any] = []
    for link in chain:
        for frame in reversed(list(_frames(link.__traceback__))):
            owner = frame.f_locals.get("self")
            # A Trainer is the culprit only while it is being built (its own arguments).
            if isinstance(owner, Trainer) and frame.f_code.co_name != "__init__":
                continue
            if owner is not None and all(owner is not seen for seen in objects):
                objects.append(owner)
    return objects


def _subcommand_config(cli: Any, attribute: str) -> Any:
    config = getattr(cli, attribute, None)
    if config is None:
        return None
    subcommand = config.get("subcommand") if hasattr(config, "get") else None
    return config.get(subcommand, config) if subcommand else config


def _walk(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` for every node of a parsed config (``[i]`` for list items)."""
    yield key, value
    items: Any = None
    if hasattr(value, "items") and callable(value.items):
        try:
            items = [(f"{key}.{k}" if key else str(k), v) for k, v in value.items(branches=True)]
        except TypeError:
            items = [(f"{key}.{k}" if key else str(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    for child_key, child in items or ():
        yield from _walk(child, child_key)


def _class_name(class_path: Any) -> str:
    return str(class_path).rsplit(".", 1)[-1]


def _component_key(cli: Any, owner: Any, message: str = "") -> tuple[str, dict[str, Any]] | None:
    """Config key of the class instance ``owner`` (by identity once built, else by class name)."""
    built = _subcommand_config(cli, "config_init")
    if built is not None:
        for key, value in _walk(built):
            if value is owner and key:
                raw = _subcommand_config(cli, "config")
                init_args = _lookup(raw, f"{key}.init_args") if raw is not None else None
                return key, _as_dict(init_args)
    raw = _subcommand_config(cli, "config")
    if raw is None:
        return None
    from lightning.pytorch import Trainer

    if isinstance(owner, Trainer) and raw.get("trainer") is not None:
        return "trainer", _as_dict(raw.get("trainer"))
    name = type(owner).__name__
    candidates = []
    for key, value in _walk(raw):
        class_path = value.get("class_path") if hasattr(value, "get") and not isinstance(value, str) else None
        if class_path is not None and _class_name(class_path) == name:
            candidates.append((key, _as_dict(value.get("init_args"))))
    if not candidates:
        return None
    # Several of one class (two ModelCheckpoints): the one whose values the message quotes.
    return max(candidates, key=lambda candidate: _quoted_values(message, candidate[1]))


def _quoted_values(message: str, init_args: dict[str, Any]) -> int:
    """How strongly the message points at these arguments: the value after "got" counts most."""
    values = [str(v) for v in init_args.values() if v is not None and not isinstance(v, bool) and str(v)]
    got = re.findall(r"got\s+[`'\"]?([^\s,;'`\"]+?)[`'\"]?(?:[\s,;.]|$)", message)
    mentioned = sum(bool(re.search(rf"(?<![\w.]){re.escape(v)}(?![\w.])", message)) for v in values)
    return 10 * sum(v in got for v in values) + mentioned


def _lookup(config: Any, key: str) -> Any:
    for candidate, value in _walk(config):
        if candidate == key:
            return value
    return None


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return dict(value) if isinstance(value, dict) else {}


# -- the argument inside the failing class ----------------------------------------------------------
_TOKEN = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"


def _argument_token(message: str, names: set[str]) -> str | None:
    """The (possibly dotted) argument name the message is about: backticked, leading, then first."""
    candidates = [m.group(1) for m in re.finditer(rf"`({_TOKEN})`", message)]
    leading = re.match(rf"\s*'?({_TOKEN})", message)
    candidates += [leading.group(1)] if leading else []
    candidates += [m.group(0) for m in re.finditer(_TOKEN, message)]
    for token in candidates:
        if token.split(".")[0] in names:
            return token
    return None


def _argument_holding(message: str, init_args: dict[str, Any]) -> str | None:
    """The argument whose configured value the message quotes (``augment`` for ``['flipp']``)."""
    for quoted in re.findall(r"'([^']+)'", message):
        for name, value in init_args.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            if quoted in map(str, values):
                return name
    return None


def _signature_defaults(cls: type) -> dict[str, Any]:
    if dataclasses.is_dataclass(cls):
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def closest(name: str, valid: list[str]) -> str | None:
    """The valid name closest to ``name``: the shortest that extends it, else difflib's best match."""
    extensions = sorted((v for v in valid if v.lower().startswith(name.lower())), key=len)
    if extensions:
        return extensions[0]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return close[0] if close else None


def _suggestion(message: str) -> str | None:
    """'did you mean ...?' for an unknown name, when the message lists the valid ones."""
    offered = re.search(r"[Dd]id you mean [`']?([\w./-]+)[`']?\?", message)
    if offered:
        return f"did you mean {offered.group(1)!r}?"
    split = re.split(r"valid(?: names| presets| choices)?(?: are|:| is)|one of", message, maxsplit=1)
    if len(split) != 2:
        return None
    given = re.findall(r"'([^']+)'", split[0])[:1]
    valid = re.findall(r"[A-Za-z_][\w\-]*", split[1])
    for name in given:
        match = closest(name, valid) if name not in valid else None
        if match:
            return f"did you mean {match!r} instead of {name!r}?"
    return "use one of the valid names listed above"


def _file_of_failed_load(err: BaseException) -> str | None:
    """The file ``torch.load`` failed on, when the error comes from reading a checkpoint/cache."""
    for link in (err, err.__context__, err.__cause__):
        if link is None:
            continue
        for frame in _frames(link.__traceback__):
            if frame.f_code.co_name == "load" and frame.f_code.co_filename.endswith(
                os.path.join("torch", "serialization.py")
            ):
                target = frame.f_locals.get("f")
                if isinstance(target, (str, os.PathLike)):
                    return str(target)
    return None


def _fix_from_message(message: str, token: str | None, key: str) -> tuple[str | None, str]:
    """``(fix, message to show)``: the message's "e.g. ..." example becomes the fix, said once (a
    closing example leaves the message; one inside parentheses stays in both)."""
    match = re.search(r"e\.g\.\s*(.+)$", message)
    if not match:
        return None, message
    example = _until_unopened_paren(match.group(1))
    stem = message[: match.start()].rstrip(" ;,:-")
    shown = stem if example == match.group(1) and stem else message
    example = example.strip().rstrip(".;")
    if token and example.startswith(token) and key.endswith(token):
        example = key + example[len(token) :]
    return f"e.g. {example}", shown


def _until_unopened_paren(text: str) -> str:
    """``text`` up to the ``)`` that closes a parenthesis opened before it ("(e.g. 0.9)" ends there),
    keeping parentheses the example opens itself ("e.g. 0.7 (each layer ...)")."""
    depth = 0
    for index, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            if depth == 0:
                return text[:index]
            depth -= 1
    return text


def describe_error(err: BaseException) -> list[str]:
    """Lines that tell the user what is wrong and how to fix it, without a traceback."""
    if isinstance(err, argparse.ArgumentError):
        return describe_parse_error(err)
    root = root_error(err)
    if isinstance(root, ConfigError):
        return [f"error: {root.key}={root.value!r} {root.problem}", f"  fix: {root.fix}"]
    message = str(root).strip() or type(root).__name__
    failed_file = _file_of_failed_load(root)
    if failed_file is not None:
        empty = Path(failed_file).is_file() and Path(failed_file).stat().st_size == 0
        reason = "it is empty" if empty else f"it is truncated or corrupt ({message.split('. ')[0]})"
        return [
            f"error: cannot read {failed_file}: {reason}",
            "  fix: pass a complete checkpoint file (e.g. the last one written by ModelCheckpoint), "
            "or delete the damaged file and rerun",
        ]
    kind = "" if isinstance(root, (ValueError, TypeError, FileNotFoundError)) else f"{type(root).__name__}: "
    cli = _find_cli(err)
    located = None
    if cli is not None:
        for owner in _failing_objects(root, err):
            located = _component_key(cli, owner, message)
            if located is not None:
                owner_class = type(owner)
                break
    suggestion = _suggestion(message)
    if located is None:
        key, token = _key_from_config(cli, message)
        head = f"error: {key}: " if key else "error: "
        example, shown = _fix_from_message(message, token, key or "")
        fix = example or suggestion
        lines = [f"{head}{kind}{shown}"]
        if fix:
            lines.append(f"  fix: {fix}")
        elif key:
            lines.append(f"  fix: set {key} to a value in the allowed range above")
        return lines
    component, init_args = located
    defaults = _signature_defaults(owner_class)
    token = _argument_token(message, set(init_args) | set(defaults)) or _argument_holding(message, init_args)
    arguments = component if component == "trainer" else f"{component}.init_args"
    if token is not None and token.startswith(f"{arguments}."):  # the message already names the full key
        token = token[len(arguments) + 1 :]
    key = f"{arguments}.{token}" if token else component
    example, shown = _fix_from_message(message, token, key)
    lines = [f"error: {key} ({owner_class.__name__}): {kind}{shown}"]
    fix = example or suggestion
    if fix is None and token is not None and isinstance(root, FileNotFoundError):
        fix = f"point {key} at the files described above"
    if fix is None and token is not None:
        default = defaults.get(token.split(".")[0], None) if "." not in token else None
        current = init_args.get(token)
        if default is not None and default != current:
            fix = f"set {key} to an allowed value, e.g. {default!r} (its default)"
        else:
            fix = f"set {key} to a value in the allowed range above"
    lines.append(f"  fix: {fix or f'change the arguments of {component} ({owner_class.__name__})'}")
    return lines


def _key_from_config(cli: Any, message: str) -> tuple[str | None, str | None]:
    """``(full key, token)`` for a dotted name early in the message (``optimizer.lr`` ->
    ``model.init_args.optimizer.lr``), found among the parsed config's keys."""
    leading = re.findall(rf"`?({_TOKEN})`?", message)
    config = _subcommand_config(cli, "config") if cli is not None else None
    if config is None or not leading:
        return None, None
    keys = [key for key, _ in _walk(config) if key]
    for token in leading[:3]:
        if "." not in token:
            continue
        for key in keys:
            if key == token or key.endswith(f".{token}"):
                return key, token
        parent = token.rsplit(".", 1)[0]
        for key in keys:
            if key.endswith(f".{parent}"):
                return f"{key}.{token.rsplit('.', 1)[1]}", token
    return None, None


# -- parse errors -----------------------------------------------------------------------------------
def _subclass_names(base: type) -> list[str]:
    """Short names of the importable, public subclasses of ``base`` (what the parser accepts by name)."""
    names: set[str] = set()
    stack = [base]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            stack.append(sub)
            module = sub.__module__
            private = sub.__name__.startswith("_") or any(p.startswith("_") for p in module.split("."))
            from_tests = module.startswith(("tests", "test_", "conftest"))
            if not (private or from_tests or inspect.isabstract(sub)):
                names.add(sub.__name__)
    return sorted(names)


_KIND_BASES = {
    "trainer.callbacks": ("callback", "lightning.pytorch.callbacks.Callback"),
    "model": ("model class", "lightning.pytorch.LightningModule"),
    "data": ("DataModule", "lightning.pytorch.LightningDataModule"),
    "trainer.logger": ("logger", "lightning.pytorch.loggers.Logger"),
}


def _import(path: str) -> Any:
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _parser_keys(err: BaseException) -> list[str]:
    """Option keys of the innermost parser that took part in the failed parse (the subcommand's)."""
    from jsonargparse import ArgumentParser

    parsers = [*getattr(_find_cli(err), "option_parsers", [])]  # a config-file key is checked by the main one
    link: BaseException | None = err
    while link is not None:
        parsers += [frame.f_locals.get("self") for frame in _frames(link.__traceback__)]
        link = link.__cause__ or link.__context__
    best: list[str] = []
    for parser in parsers:
        if isinstance(parser, ArgumentParser):
            try:
                keys = list(parser.get_defaults().keys())  # a Namespace: dotted leaf keys
            except Exception:  # a parser that cannot report defaults only loses the suggestion
                continue
            best = keys if len(keys) > len(best) else best
    return [key for key in best if not key.startswith("__")]


# jsonargparse's line for an argument of a known class given a value of the wrong type.
_TYPED_ARGUMENT_ERROR = (
    r"class_path '([\w.]+)':\s+Parser key \"([\w.]+)\":\s+Expected a <class '(\w+)'>\. Got value: (.*)"
)


# A value of each simple type, shown in the fix line of a wrong-type error.
EXAMPLE_VALUES = {"int": "1", "float": "0.1", "bool": "true", "str": "..."}


def _wrong_type_lines(key: str, class_path: str, argument: str, expected: str, got: str) -> list[str]:
    """``key``: ``trainer.callbacks...`` (a list: the item is named by its class), ``model``/``data`` or
    the full key of the argument (``model.init_args.scheduler.kwargs``)."""
    example = EXAMPLE_VALUES.get(expected, "...")
    name = _class_name(class_path)
    base = key.split(".init_args.")[0]
    if base == "trainer.callbacks":
        return [
            f"error: {base} ({name}): init_args.{argument}={got!r}: expected {expected}",
            f"  fix: e.g. `{argument}: {example}` in its init_args (on the command line "
            f"--{base}.{argument}={example} sets it on the last callback)",
        ]
    full_key = key if key.endswith(f".{argument}") else f"{base}.init_args.{argument}"
    return [f"error: {full_key}={got!r} ({name}): expected {expected}", f"  fix: e.g. --{full_key}={example}"]


def describe_parse_error(err: argparse.ArgumentError) -> list[str]:
    """Lines for a command-line/config error found while parsing (before anything is built)."""
    message = str(err).strip()
    unrecognized = re.match(r"unrecognized arguments: (.+)", message, re.IGNORECASE)
    if unrecognized:
        options = unrecognized.group(1).split()
        return _unknown_options(err, f"error: unknown option(s): {unrecognized.group(1)}", options, "--")
    unknown_key = re.match(r"Subcommand '(\w+)' does not accept option '([^']+)'", message)
    if unknown_key:  # a misspelt key in a config file (on the command line it is "unrecognized")
        subcommand, option = unknown_key.groups()
        head = f"error: unknown config key {option!r}: `{subcommand}` has no such option"
        return _unknown_options(err, head, [option], "")
    key_match = re.match(r'Parser key "([^"]+)":', message)
    if key_match is None:
        first = message.splitlines()[0] if message else "invalid arguments"
        fix = _command_fix(first) or "see `lightning-tricks fit --help` for the accepted options"
        return [f"error: {first}", f"  fix: {fix}"]
    key = key_match.group(1)
    values = re.findall(r"Given value: (.*)", message)
    value = values[-1] if values else None
    nested = re.match(r"NestedArg\(key='([^']+)', val=(?:'(.*)'|(.*))\)$", value or "")
    if nested:  # --model.init_args.x.y=v reported against "model"
        key, value = f"{key}.init_args.{nested.group(1)}", nested.group(2) or nested.group(3)
    typed = re.search(_TYPED_ARGUMENT_ERROR, message)
    if typed:  # a value of the wrong type for an argument the class has (other union members may refuse it)
        return _wrong_type_lines(key, *typed.groups())
    rejected = re.search(r"class_path '([\w.]+)':\s+Option '(\w+)[\w.]*' is not accepted", message)
    if rejected:  # `Option 'typo.x.y'` for a dict value given to a misspelt argument: the argument is `typo`
        return _rejected_option(_nested_key(key, message[: rejected.start()]), *rejected.groups())
    root = root_error(err)
    detail = str(root).split(". Got value:")[0].strip() if root is not err else ""
    base_key = re.sub(r"\[\d+\]$", "", key)
    if (
        base_key in _KIND_BASES
        and value is not None
        and ("import path" in message or "not accessible" in message or "Not a valid subclass" in message)
    ):
        kind, base_path = _KIND_BASES[base_key]
        valid = _subclass_names(_import(base_path))
        match = closest(value.rsplit(".", 1)[-1], valid)
        lines = [f"error: {key}: unknown {kind} {value!r}; valid {kind} names: {', '.join(valid)}"]
        option = f"--{key}{'+' if base_key == 'trainer.callbacks' else ''}"
        lines.append(
            f"  fix: did you mean {match!r}? e.g. {option}={match}"
            if match
            else f"  fix: use one of the {kind} names above"
        )
        return lines
    expected = set(re.findall(r"Expected a <class '([\w.]+)'>", message))
    expected = sorted(expected, key=lambda name: (name == "NoneType", name))
    reason = detail or (message.splitlines()[1].strip() if len(message.splitlines()) > 1 else message)
    if expected:
        reason = "expected " + " or ".join("null" if e == "NoneType" else e for e in expected)
    choices = list(dict.fromkeys(_literal_choices(message)))  # e.g. trainer.precision's
    if choices:
        reason = f"expected one of {', '.join(choices)}{' or null' if 'NoneType' in expected else ''}"
    lines = [f"error: {key}={value!r}: {reason}" if value is not None else f"error: {key}: {reason}"]
    typed = [EXAMPLE_VALUES[e] for e in expected if e in EXAMPLE_VALUES]
    if choices:
        typed = [closest(str(value), choices) or choices[0]]
    fallback = _command_fix(message) or f"correct {key} (see --help)"
    lines.append(f"  fix: e.g. --{key}={typed[0]}" if typed else f"  fix: {fallback}")
    return lines


def _nested_key(key: str, message: str) -> str:
    """``key`` extended by the nested ``Parser key`` lines that lead to the end of ``message``
    (``model`` -> ``model.init_args.optimizer`` for a misspelt key of the recipe's optimizer)."""
    lines = message.splitlines() or [""]
    chain: list[str] = []
    indent = len(lines[-1]) - len(lines[-1].lstrip())
    for line in reversed(lines):
        nested = re.match(r'(\s+)Parser key "([^"]+)":', line)
        if nested and len(nested.group(1)) < indent:  # an ancestor (less indented), not a sibling's
            chain.insert(0, nested.group(2))
            indent = len(nested.group(1))
    return ".".join([key, *(f"init_args.{name}" for name in chain)])


def _literal_choices(message: str) -> list[str]:
    """The allowed values of jsonargparse's "Expected a typing.Literal[...]" lines."""
    return [
        choice.strip().strip("'\"")
        for group in re.findall(r"Expected a typing\.Literal\[(.*)\]", message)
        for choice in group.split(",")
    ]


def _command_fix(message: str) -> str | None:
    """The fix for a subcommand, a missing model/data or a config file that does not exist."""
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        commands = [*re.findall(r"'(\w+)'", choice.group(2)), "search", "ablate"]
        match = closest(choice.group(1), commands)
        return f"{f'did you mean {match!r}? ' if match else ''}the subcommands are {', '.join(commands)}"
    if re.search(r"required: .*\bmodel\b", message):
        return "give a config with model and data, e.g. --config configs/digits.yaml (see --help)"
    missing = re.search(r"File does not exist: '([^']+)'", message)
    if missing:
        path = Path(missing.group(1))
        siblings = sorted(f.name for f in path.parent.glob("*.y*ml")) if path.parent.is_dir() else []
        match = closest(path.name, siblings)
        return f"did you mean {path.parent / match}?" if match else f"{path} does not exist: check the path"
    return None


def _unknown_options(err: BaseException, head: str, options: list[str], prefix: str) -> list[str]:
    """``head`` and a did-you-mean fix for the first of ``options`` with a close known key."""
    keys = _parser_keys(err)
    for option in options:
        name = option.lstrip("-").split("=")[0].removeprefix("init_args.")
        close = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
        if close:
            return [head, f"  fix: did you mean {prefix}{close[0]}?"]
    return [head, "  fix: check the spelling against `lightning-tricks fit --help`"]


def _accepted_arguments(cls: type) -> list[str]:
    """The arguments the parser accepts for ``cls``, those it forwards through ``**kwargs`` included."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_class_arguments(cls, fail_untyped=False)
        keys = parser.get_defaults().keys()
    except Exception:  # a class jsonargparse cannot describe: its own signature
        return sorted(_signature_defaults(cls))
    return sorted({key.split(".")[0] for key in keys if not key.startswith("__")})


def _rejected_option(key: str, class_path: str, option: str) -> list[str]:
    """An argument given to a class that has no such argument (e.g. to the wrong list item)."""
    try:
        accepted = _accepted_arguments(_import(class_path))
    except (ImportError, AttributeError, ValueError):
        accepted = []
    name = _class_name(class_path)
    lines = [f"error: {key}: {name} has no argument {option!r}; its arguments: {', '.join(accepted)}"]
    match = closest(option, accepted)
    if match:
        lines.append(f"  fix: did you mean {match!r}?")
    elif key == "trainer.callbacks":
        lines.append(
            f"  fix: --{key}.{option}=... applies to the last callback in the list ({name}); add the "
            f"callback it belongs to first, e.g. --{key}+=ModelCheckpoint --{key}.{option}=..."
        )
    else:
        lines.append(f"  fix: use one of the arguments of {name} listed above")
    return lines
