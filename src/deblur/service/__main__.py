from deblur.service.server import main

main()
