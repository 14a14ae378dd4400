from services.ingress.service import IngressService
from services.runtime.service import main

main(IngressService)
