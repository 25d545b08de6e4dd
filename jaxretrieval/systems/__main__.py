"""`python -m jaxretrieval.systems`: the registered systems, one line each with what it takes."""

import sys

from jaxretrieval.systems import main

sys.exit(main())
