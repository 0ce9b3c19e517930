"""Deprecated: moved to `nativevl.evaluation.calibrate`; this module goes in the next release.

python -m nativevl.evaluation.calibrate --model M --data D --output-dir OUT    # instead of nativevl.training.cascade
"""

import sys
import warnings

from nativevl.evaluation.calibrate import (  # noqa: F401  (the names this module had)
    FRONTIER,
    RUN_FILE,
    choose_threshold,
    collect_answers,
    fallback_frontier,
    loss_interval,
    main,
)


MESSAGE = (
    "nativevl.training.cascade moved to nativevl.evaluation.calibrate and goes in the next release: run "
    "`python -m nativevl.evaluation.calibrate` (same arguments) and import from nativevl.evaluation.calibrate"
)

if __name__ == "__main__":
    print(f"warning: {MESSAGE}", file=sys.stderr)
    sys.exit(main())
warnings.warn(MESSAGE, FutureWarning, stacklevel=2)
