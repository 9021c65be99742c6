"""The ground floor: what every other package may import (the user-error type). Nothing here imports the
project or any third-party package."""
