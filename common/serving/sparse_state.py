"""State dicts with mostly-zero tables stored by their non-zero rows.

fedals' item table is zero outside the items a market sells: over a catalog of a million
products a market's model is 512 MB of which it fills a few percent. Stored by its non-zero
rows (the values, and the table's length followed by the rows' indices under
``<name>@rows``), it takes what the market sells. Dense tables are stored as they are.
"""

import torch

SPARSE_SUFFIX = "@rows"  # the length and non-zero rows of the table of the same name without it


def compact_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every 2-d table that is mostly zero rows stored as its non-zero rows."""
    compact = {}
    for name, tensor in state.items():
        if tensor.dim() == 2 and len(tensor) > 1:
            rows = torch.nonzero(tensor.any(dim=1)).flatten()
            if len(rows) < len(tensor) // 2:
                compact[name] = tensor[rows].clone()
                compact[name + SPARSE_SUFFIX] = torch.cat([torch.tensor([len(tensor)]), rows]).to(torch.int64)
                continue
        compact[name] = tensor
    return compact


def expand_state(
    compact: dict[str, torch.Tensor], into: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The state dict :func:`compact_state` stored (a dense state dict is returned as it is).

    Parameters
    ----------
    compact : dict
        What :func:`compact_state` returned.
    into : dict, optional
        Tensors to expand into, in place (a model's ``state_dict()``, whose tensors are its
        parameters): a stored table is written into the model's own without a dense copy.

    Raises
    ------
    ValueError
        If a table's stored rows do not fit its stored length or its values, or ``into`` has a
        tensor of another shape or none of that name; checked before anything is allocated,
        so a small file cannot make a large table.
    """
    state = {}
    for name, tensor in compact.items():
        if name.endswith(SPARSE_SUFFIX):
            continue
        if into is not None and name not in into:
            raise ValueError(f"The stored state holds {name}, which the model does not have.")
        sparse = compact.get(name + SPARSE_SUFFIX)
        if sparse is None:
            state[name] = tensor
            continue
        if sparse.dim() != 1 or len(sparse) < 1 or sparse.dtype != torch.int64:
            raise ValueError(f"The stored rows of {name} are not a 1-d int64 tensor of its length and rows.")
        length, rows = int(sparse[0]), sparse[1:]
        if (
            tensor.dim() != 2
            or len(rows) != len(tensor)
            or (len(rows) and not 0 <= int(rows.min()) <= int(rows.max()) < length)
        ):
            raise ValueError(
                f"The stored table {name} has {len(rows)} row indices for {len(tensor)} rows of a {length}-row table."
            )
        shape = (length, tensor.shape[1])
        if into is not None and name in into:
            if tuple(into[name].shape) != shape:
                raise ValueError(f"The stored table {name} is {shape}, the model's is {tuple(into[name].shape)}.")
            dense = into[name]
            with torch.no_grad():
                dense.zero_()
        else:
            dense = torch.zeros(shape, dtype=tensor.dtype)
        with torch.no_grad():
            dense[rows] = tensor.to(dense.dtype)
        state[name] = dense
    return state
