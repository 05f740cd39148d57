import sys
import unittest

sys.path.insert(0, "src")

from greet import greet


class GreetTest(unittest.TestCase):
    def test_greet(self) -> None:
        self.assertEqual(greet("cell"), "hello, cell")


if __name__ == "__main__":
    unittest.main()
