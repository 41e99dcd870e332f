"""Print the site-packages of the running virtualenv, if any, for a .pth file.

`python -m venv --system-site-packages` exposes the base interpreter's packages but not those
of a virtualenv the user has activated; this line exposes those too, so that the user's own
torch is found instead of a second one being installed.
"""

import sys
import sysconfig

if sys.prefix != sys.base_prefix:
    print(sysconfig.get_paths()["purelib"])
