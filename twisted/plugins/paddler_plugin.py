from twisted.application.service import ServiceMaker

paddler = ServiceMaker(
    "paddler",
    "paddler.tap",
    "Slot-aware load balancer for llama.cpp servers",
    "paddler",
)
