"""`python -m jaxretrieval.embed`: a split's image and caption embeddings in clip-retrieval's layout (see
jaxretrieval.export, which holds the command)."""

import sys

from jaxretrieval.export import main

if __name__ == "__main__":
    sys.exit(main())
