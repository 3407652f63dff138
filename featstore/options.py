"""Value types and the strict section base shared by config schemas: the study config (featstore/sweep/config.py)
and the options each registered protocol carries (featstore/split.py)."""
from typing import Annotated, ClassVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError


def _text(v):
    # YAML reads `2024` as a number (fine: it is a name) but yes/no/on/off as booleans (surely not meant)
    if isinstance(v, bool):
        raise PydanticCustomError("name_bool", "is a boolean, not a name (YAML reads yes/no/on/off/true/false as "
                                  "booleans: quote it)")
    return str(v) if isinstance(v, int | float) else v


def one_or_list(v):
    return [v] if isinstance(v, str | int | float) and not isinstance(v, bool) else v


def distinct(v):
    dups = sorted({x for x in v if v.count(x) > 1}) if v else []
    if dups:
        raise PydanticCustomError("duplicate", "lists {dups} more than once", {"dups": ", ".join(dups)})
    return v


Name = Annotated[str, BeforeValidator(_text), Field(min_length=1)]
# a list of names; one name alone is taken as a list of one
Names = Annotated[list[Name], BeforeValidator(one_or_list), AfterValidator(distinct)]


class Section(BaseModel):
    """A config section: unknown keys are refused, numbers must be numbers (no "5" -> 5, no true -> 1)."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    what: ClassVar[str] = "key"  # what this section's keys are called in messages


def env_number(name: str, default: float, minimum: float = 0, integer: bool = False) -> float:
    """A number from the environment variable `name` (default when unset or empty); anything else, or
    a value below `minimum`, is a UserError naming the variable and the value, not a traceback."""
    import math
    import os

    from featstore.errors import UserError

    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    try:
        v = int(raw) if integer else float(raw)
        ok = math.isfinite(v) and v >= minimum
    except ValueError:
        ok = False
    if not ok:
        kind = "a whole number" if integer else "a number"
        raise UserError(f"{name}={raw[:40]!r} is not {kind} of seconds >= {minimum:g}; unset it for the default "
                        f"({default:g})")
    return v


# the sweep's timing variables: name -> (default seconds, minimum, whole seconds only). Read where used
# (featstore.sweep.fit, featstore.sweep.run) and checked by the sweep commands first, before any model library
# loads, so a bad value is one line at once
TIMING = {"FEATSTORE_SWEEP_HEARTBEAT_S": (5, 1, True), "FEATSTORE_SWEEP_GRACE_S": (30, 1, True),
          "FEATSTORE_WRITE_WAIT_S": (600, 0, False)}


def timing(name: str) -> float:
    default, minimum, integer = TIMING[name]
    return env_number(name, default, minimum, integer)
