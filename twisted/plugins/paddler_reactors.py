from twisted.application.reactors import Reactor

paddlerLean = Reactor(
    "paddler-lean",
    "paddler.lean_reactor",
    "epoll, dispatching I/O events without a logging context each (paddler's default)",
)
