"""A class whose unpickling would run code: a .ckpt holding one must be refused, never executed."""

EXECUTED: list[str] = []


def _run() -> "Payload":
    EXECUTED.append("ran")
    return Payload()


class Payload:
    def __reduce__(self):
        return (_run, ())
