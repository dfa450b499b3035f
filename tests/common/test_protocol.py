"""The wire contract, :mod:`common.protocol`: its keys are distinct strings, and neither app spells one itself.

The second half walks the source of ``server/`` and ``clients/`` and fails on a string
literal equal to one of the protocol's keys: a key spelled again on one side, which a
rename in the protocol would silently leave behind. A few keys are common words that
also name something off the wire in those files (an entry of ``checkpoint.pt``, the
node-config key ``market``, ...): see :data:`OFF_THE_WIRE`. Those are flagged only where
they index a message (its content, its records, or a name bound to one of them) or are
a key of a ``RecordDict`` built in place, which cannot catch every re-spelling of them
(a record passed on as a parameter, a dict built before it becomes a record).
"""

import ast

from common import protocol
from tests.paths import REPO

APPS = ("server", "clients")

KEYS = {name: getattr(protocol, name) for name in protocol.__all__ if isinstance(getattr(protocol, name), str)}
GROUPS = {name: getattr(protocol, name) for name in protocol.__all__ if isinstance(getattr(protocol, name), tuple)}

# Key values the apps' files also use with another meaning, and that meaning.
OFF_THE_WIRE = {
    protocol.ARRAYS_RECORD: "an entry of checkpoint.pt and published.pt (server.history)",
    protocol.CONFIG_RECORD: "the run config in history.json (server.history)",
    protocol.METRICS_RECORD: "a served model's metrics (clients.served, clients.join, the forks of clients.client_app)",
    protocol.MARKET_KEY: "the node-config key naming a deployed region's market",
    protocol.TRAINING_ID_KEY: "an entry of checkpoint.pt, published.pt, the best-model info and a market's state files",
    protocol.BATCH_SIZE_KEY: "an entry of a DP market's noise calibration (clients.privacy_state)",
}

_RECORDS = {"content", "config_records", "array_records", "metric_records"}  # attributes that are a message's
_LOOKUPS = {"get", "pop", "setdefault"}


def _is_message(node: ast.AST, aliases: set[str]) -> bool:
    """``node`` is a message's content or one of its records (``msg.content["config"]``, ``round_config``, ...)."""
    if isinstance(node, ast.Attribute):
        return node.attr in _RECORDS or _is_message(node.value, aliases)
    if isinstance(node, ast.Subscript):
        return _is_message(node.value, aliases)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _LOOKUPS:
        return _is_message(node.func.value, aliases)
    return isinstance(node, ast.Name) and node.id in aliases


def _message_aliases(tree: ast.AST) -> set[str]:
    """Names bound, anywhere in the module, to a message's content or record (repeated until none is added)."""
    aliases: set[str] = set()
    while True:
        found = {
            node.targets[0].id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and _is_message(node.value, aliases)
        }
        if found <= aliases:
            return aliases
        aliases |= found


def _message_keys(tree: ast.AST) -> list[ast.Constant]:
    """The string literals that index a message, test membership in one, or key a ``RecordDict`` built in place."""
    aliases = _message_aliases(tree)
    found: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _is_message(node.value, aliases):
            found.append(node.slice)
        elif isinstance(node, ast.Compare) and any(isinstance(op, ast.In | ast.NotIn) for op in node.ops):
            if any(_is_message(comparator, aliases) for comparator in node.comparators):
                found.append(node.left)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _LOOKUPS:
            if _is_message(node.func.value, aliases) and node.args:
                found.append(node.args[0])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "RecordDict":
            found.extend(key for arg in node.args if isinstance(arg, ast.Dict) for key in arg.keys if key is not None)
    return [node for node in found if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def respelled(source: str, where: str) -> list[str]:
    """Each literal in ``source`` that spells a protocol key again, as ``where:line: 'value'``."""
    tree = ast.parse(source)
    values = set(KEYS.values())
    anywhere = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in values and node.value not in OFF_THE_WIRE
    ]
    in_messages = [node for node in _message_keys(tree) if node.value in OFF_THE_WIRE]
    return sorted({f"{where}:{node.lineno}: {node.value!r}" for node in anywhere + in_messages})


def _app_sources() -> dict[str, str]:
    return {
        str(path.relative_to(REPO)): path.read_text(encoding="utf-8")
        for app in APPS
        for path in sorted((REPO / app).rglob("*.py"))
    }


def test_every_key_is_a_unique_non_empty_string():
    values = list(KEYS.values())

    assert len(values) > 30
    assert all(isinstance(value, str) and value.strip() == value and value for value in values)
    assert len(set(values)) == len(values), sorted(value for value in values if values.count(value) > 1)


def test_the_module_exports_every_key_and_its_groups_hold_keys_only():
    public = {name for name in vars(protocol) if name.isupper()}

    assert public == set(protocol.__all__) == set(KEYS) | set(GROUPS)
    for name, group in GROUPS.items():
        assert group and set(group) <= set(KEYS.values()) and len(set(group)) == len(group), name


def test_neither_app_spells_a_key_of_the_protocol():
    sources = _app_sources()

    found = [line for path, source in sources.items() for line in respelled(source, path)]

    assert len(sources) > 15
    assert found == [], "spelled again instead of imported from common.protocol:\n" + "\n".join(found)


def test_every_exemption_is_a_key_still_used_off_the_wire():
    sources = _app_sources().values()

    for value in OFF_THE_WIRE:
        assert value in KEYS.values()
        assert any(
            isinstance(node, ast.Constant) and node.value == value
            for source in sources
            for node in ast.walk(ast.parse(source))
        ), f"{value!r} is no longer spelled in server/ or clients/: drop its exemption"


def test_the_check_catches_a_key_spelled_again():
    final = 'if parse_bool("final-round", round_config.get("final-round", False)):\n    pass\n'
    record = (
        'round_config = msg.content["config"]\n'
        'reply = RecordDict({"metrics": metrics})\n'
        'node = "market" in context.node_config\n'
        'checkpoint = {"arrays": arrays}\n'
        'name = round_config.get("training-id")\n'
        'ok = "market" in reply.content.config_records\n'
    )

    assert respelled(final, "clients/served.py") == [
        "clients/served.py:1: 'final-round'",
    ]
    assert respelled(record, "x.py") == [
        "x.py:1: 'config'",
        "x.py:2: 'metrics'",
        "x.py:5: 'training-id'",
        "x.py:6: 'market'",
    ]
