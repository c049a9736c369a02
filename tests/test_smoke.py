import procsched


def square(x: int) -> int:
    return x * x


def test_submit_returns_result() -> None:
    with procsched.Pool(2) as pool:
        assert pool.submit(square, 7).result(timeout=10) == 49
