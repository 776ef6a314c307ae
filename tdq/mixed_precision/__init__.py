"""Mixed precision: Fisher sensitivity profiles, precision schedules and the planners that make them.

`profile` holds `SensitivityProfile`, `fisher` measures it (`profile_sensitivity`), `schedule` holds
`PrecisionSchedule`, `planners` chooses one under a budget (`plan_precision`: exact MILP, its binary program in
`milp`; `plan_uniform`), `costs` prices a schedule (weight bytes, BOPs).
"""

from tdq.mixed_precision.fisher import profile_sensitivity
from tdq.mixed_precision.planners import PrecisionBudget, plan_precision, plan_uniform, schedule_objective
from tdq.mixed_precision.profile import SensitivityProfile
from tdq.mixed_precision.schedule import PrecisionSchedule

__all__ = [
    "PrecisionBudget",
    "PrecisionSchedule",
    "SensitivityProfile",
    "plan_precision",
    "plan_uniform",
    "profile_sensitivity",
    "schedule_objective",
]
