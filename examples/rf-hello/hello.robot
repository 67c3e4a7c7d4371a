*** Settings ***
Documentation       The smallest Robot Framework package: one task that says hello and passes.


*** Tasks ***
Say Hello
    Log To Console    Hello from Robot Framework!
    Should Be Equal As Integers    ${1 + 1}    2
