"""Standard Webhooks signatures (protocol/webhooks.py)."""

from protocol import webhooks

# The example in the Standard Webhooks spec and its reference libraries.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1614265330
BODY = b'{"test": 2432232314}'
SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_spec_example() -> None:
    assert webhooks.sign(SECRET, MSG_ID, TIMESTAMP, BODY) == SIGNATURE


def test_verify_round_trip_and_refusals() -> None:
    now = TIMESTAMP + 10
    assert webhooks.verify(SECRET, MSG_ID, str(TIMESTAMP), f"v1,bad {SIGNATURE}", BODY, now)
    assert not webhooks.verify(SECRET, MSG_ID, str(TIMESTAMP), SIGNATURE, BODY + b" ", now)
    assert not webhooks.verify(SECRET, "other", str(TIMESTAMP), SIGNATURE, BODY, now)
    assert not webhooks.verify(SECRET, MSG_ID, str(TIMESTAMP), SIGNATURE, BODY, now + 3600)
    assert not webhooks.verify(SECRET, MSG_ID, "soon", SIGNATURE, BODY, now)
