"""What the commands need around the maths: durable writes, processes, names, errors a user fixes."""

__all__ = ["command", "durable", "names", "processes"]
