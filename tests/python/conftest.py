import os
import sys

# Use the package from the source tree unless an installed one is asked for (KVQ_TEST_INSTALLED=1).
if not os.environ.get("KVQ_TEST_INSTALLED"):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))
