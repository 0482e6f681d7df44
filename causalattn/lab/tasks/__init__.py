"""The lab's generated tasks: CAT's cancer-risk Spurious Token Game (`stg`), the shortcut variant
(`shortcut`), two dialects (`dialects`) and the random-cause control (`controls`)."""
from causalattn.lab.tasks import controls, dialects, shortcut, stg
from causalattn.lab.tasks.stg import Splits, generate, make_splits

__all__ = ["Splits", "controls", "dialects", "generate", "make_splits", "shortcut", "stg"]
