"""Registry of the federated personalization methods and what each one shares."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """How a federated method splits the model between server and market."""

    name: str
    share_head: bool  # True: the head's non-user parameters are averaged too (FedAvg)
    description: str


METHODS = {
    method.name: method
    for method in (
        Method("fedavg", True, "everything but user embeddings is averaged"),
        Method("fedper", False, "encoder averaged, head kept and trained locally"),
    )
}
BASELINES = ("local", "pooled")


def get_method(name: str) -> Method:
    """The federated method called ``name``; raises on unknown names."""
    if name not in METHODS:
        raise ValueError(
            f"Unknown federated method '{name}'; choose one of {sorted(METHODS)}."
        )
    return METHODS[name]
