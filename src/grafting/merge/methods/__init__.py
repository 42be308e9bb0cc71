"""The built-in merge methods, one file each; importing this module registers them."""
from . import linear  # noqa: F401
from . import task_arithmetic  # noqa: F401
from . import ties  # noqa: F401
from . import dare  # noqa: F401
from . import breadcrumbs  # noqa: F401
from . import della  # noqa: F401
from . import slerp  # noqa: F401
from . import model_stock  # noqa: F401
from . import lines  # noqa: F401
from . import pcb  # noqa: F401
