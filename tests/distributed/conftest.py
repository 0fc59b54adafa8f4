import sys
from pathlib import Path

# Rank bodies live in the test modules; spawned ranks import them from this folder.
sys.path.insert(0, str(Path(__file__).parent))
